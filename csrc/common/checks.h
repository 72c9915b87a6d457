// Input checks and dtype rules shared by the torch bindings of every op (CPU .cpp files and the
// host side of the CUDA .cu bindings): device, element type, accumulation type, inner stride.
// Errors name the argument, as the Python-side checks do.
#pragma once
#include <torch/extension.h>

namespace seqrec_fast {

// t lives on `dev`: a CPU tensor for a CPU device; for a CUDA device a CUDA tensor on that very
// device (the other inputs' one).
inline void check_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  if (dev.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
    return;
  }
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, " like the other inputs, got ",
              t.device());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  check_device(t, name, at::Device(at::kCPU));
}

// float32, float64, bfloat16 or float16
inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

// Accumulation type of an input type: float64 for float64, float32 for every other float.
inline at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_inner_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
}

}  // namespace seqrec_fast
