// Input handling shared by the CPU (routing_cpu.cpp) and CUDA (routing_cuda.cu) bindings of
// the routing kernels: the two layouts of u_hat and every argument check, parametrised by the
// device the inputs must be on and the accumulation type of c_last / s_last / init_logits
// (the input's on CPU, float32 on CUDA). Element-type checks stay in each binding (the CUDA
// kernels take no float64).
#pragma once
#include <optional>

#include <torch/extension.h>

#include "common/checks.h"
#include "common/registry.h"

namespace seqrec_fast {
namespace routing_binding {

// u (B, L, d) is the shared layout (MIND), u (L, B, K, d) the per-position one (ComiRec-DR).
struct Layout {
  bool shared;
  int64_t B, K, L, d;
  int64_t sb, sk, sl;  // strides of u for batch, interest (0 when shared), position
};

inline Layout u_layout(const at::Tensor& u, int64_t K) {
  Layout lo{};
  if (u.dim() == 3) {
    lo.shared = true;
    lo.B = u.size(0);
    lo.L = u.size(1);
    lo.d = u.size(2);
    lo.K = K;
    lo.sb = u.stride(0);
    lo.sl = u.stride(1);
    lo.sk = 0;
  } else {
    TORCH_CHECK(u.dim() == 4,
                "u must be (B, L, d) (shared) or (L, B, K, d) (per_position), got shape ",
                u.sizes());
    lo.shared = false;
    lo.L = u.size(0);
    lo.B = u.size(1);
    TORCH_CHECK(u.size(2) == K, "u (L, B, K, d) must have K = num_interests = ", K,
                " in dim 2, got shape ", u.sizes());
    lo.K = K;
    lo.d = u.size(3);
    lo.sl = u.stride(0);
    lo.sb = u.stride(1);
    lo.sk = u.stride(2);
  }
  return lo;
}

inline void check_args(int64_t num_interests, int64_t iters) {
  TORCH_CHECK(num_interests >= 1, "num_interests must be >= 1, got ", num_interests);
  TORCH_CHECK(iters >= 1, "iters must be >= 1, got ", iters);
}

// Layout of the u given to a backward (detach=false), checked against the sizes of grad_v/mask.
inline Layout bwd_u_layout(const at::Tensor& u, bool per_position, int64_t B, int64_t K,
                           int64_t L, int64_t d) {
  check_inner_stride(u, "u");
  TORCH_CHECK(u.dim() == (per_position ? 4 : 3), "u must be ",
              per_position ? "(L, B, K, d) for per_position" : "(B, L, d) for shared",
              ", got shape ", u.sizes());
  Layout lo = u_layout(u, K);
  if (per_position) {
    SEQREC_FAST_CHECK_SHAPE(u, L, B, K, d);
  } else {
    SEQREC_FAST_CHECK_SHAPE(u, B, L, d);
  }
  return lo;
}

// mask (B, L) bool on dev
inline void check_mask(const at::Tensor& mask, int64_t B, int64_t L, const at::Device& dev) {
  check_device(mask, "mask", dev);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ",
              mask.scalar_type());
  SEQREC_FAST_CHECK_SHAPE(mask, B, L);
  check_inner_stride(mask, "mask");
}

// init_logits (B, K, L) float32 / float64 on dev, or None; returned in the type acc.
inline std::optional<at::Tensor> prepare_init(const std::optional<at::Tensor>& init_opt,
                                              int64_t B, int64_t K, int64_t L,
                                              const at::Device& dev, at::ScalarType acc) {
  if (!init_opt.has_value() || !init_opt->defined()) return std::nullopt;
  const at::Tensor& init = *init_opt;
  check_device(init, "init_logits", dev);
  TORCH_CHECK(init.scalar_type() == at::kFloat || init.scalar_type() == at::kDouble,
              "init_logits must be float32 or float64, got ", init.scalar_type());
  SEQREC_FAST_CHECK_SHAPE(init, B, K, L);
  check_inner_stride(init, "init_logits");
  if (init.scalar_type() == acc) return init;
  return init.to(acc);  // keeps stride 1 in the last dimension
}

// The checked inputs of a forward call (u's device and element type checked by the caller).
struct ForwardInputs {
  Layout lo;
  std::optional<at::Tensor> init;  // in the accumulation type
};

inline ForwardInputs check_forward_inputs(const at::Tensor& u, const at::Tensor& mask,
                                          const std::optional<at::Tensor>& init_logits,
                                          int64_t num_interests, const at::Device& dev,
                                          at::ScalarType acc) {
  check_inner_stride(u, "u");
  ForwardInputs in;
  in.lo = u_layout(u, num_interests);
  check_mask(mask, in.lo.B, in.lo.L, dev);
  in.init = prepare_init(init_logits, in.lo.B, in.lo.K, in.lo.L, dev, acc);
  return in;
}

// The checked inputs of a backward call (grad_v's device and element type checked by the
// caller): grad_v made contiguous, the sizes, u's layout when u is given, c_last / s_last
// (contiguous) when detach, init_logits (in acc) when not.
struct BackwardInputs {
  at::Tensor grad_v;
  int64_t B, K, L, d;
  bool have_u;
  Layout lo;
  at::Tensor c_last, s_last;
  std::optional<at::Tensor> init;
};

inline BackwardInputs check_backward_inputs(
    const at::Tensor& grad_v_in, const std::optional<at::Tensor>& u_opt, const at::Tensor& mask,
    const std::optional<at::Tensor>& init_logits, const std::optional<at::Tensor>& c_last_opt,
    const std::optional<at::Tensor>& s_last_opt, int64_t num_interests, bool detach,
    bool per_position, const at::Device& dev, at::ScalarType acc) {
  TORCH_CHECK(grad_v_in.dim() == 3, "grad_v must be (B, K, d), got shape ", grad_v_in.sizes());
  BackwardInputs in{};
  in.grad_v = grad_v_in.contiguous();
  in.B = in.grad_v.size(0);
  in.K = num_interests;
  in.d = in.grad_v.size(2);
  TORCH_CHECK(in.grad_v.size(1) == in.K, "grad_v must be (B, K, d) with K = num_interests = ",
              in.K, ", got shape ", in.grad_v.sizes());
  check_device(mask, "mask", dev);
  TORCH_CHECK(mask.dim() == 2, "mask must be (B, L), got shape ", mask.sizes());
  in.L = mask.size(1);
  check_mask(mask, in.B, in.L, dev);
  const at::ScalarType st = in.grad_v.scalar_type();

  in.have_u = u_opt.has_value() && u_opt->defined();
  if (in.have_u) {
    const at::Tensor& u = *u_opt;
    check_device(u, "u", dev);
    TORCH_CHECK(u.scalar_type() == st, "u must have grad_v's dtype ", st, ", got ",
                u.scalar_type());
    in.lo = bwd_u_layout(u, per_position, in.B, in.K, in.L, in.d);
  }
  TORCH_CHECK(detach || in.have_u, "u is required when detach is false");

  if (detach) {
    TORCH_CHECK(c_last_opt.has_value() && c_last_opt->defined(),
                "c_last is required when detach is true");
    TORCH_CHECK(s_last_opt.has_value() && s_last_opt->defined(),
                "s_last is required when detach is true");
    const at::Tensor& c_last = *c_last_opt;
    const at::Tensor& s_last = *s_last_opt;
    check_device(c_last, "c_last", dev);
    check_device(s_last, "s_last", dev);
    TORCH_CHECK(c_last.scalar_type() == acc, "c_last must be ", acc, ", got ",
                c_last.scalar_type());
    TORCH_CHECK(s_last.scalar_type() == acc, "s_last must be ", acc, ", got ",
                s_last.scalar_type());
    SEQREC_FAST_CHECK_SHAPE(c_last, in.B, in.K, in.L);
    SEQREC_FAST_CHECK_SHAPE(s_last, in.B, in.K, in.d);
    in.c_last = c_last.contiguous();
    in.s_last = s_last.contiguous();
  } else {
    in.init = prepare_init(init_logits, in.B, in.K, in.L, dev, acc);
  }
  return in;
}

// Strides of grad_u's row b (batch, interest, position): per_position (L, B, K, d): element
// (k, l) at b*K*d + k*d + l*B*K*d; shared (B, L, d), summed over interests: b*L*d + l*d.
struct GradStrides {
  int64_t sb, sk, sl;
};

inline GradStrides grad_u_strides(bool per_position, int64_t B, int64_t K, int64_t L,
                                  int64_t d) {
  if (per_position) return {K * d, d, B * K * d};
  return {L * d, 0, d};
}

}  // namespace routing_binding
}  // namespace seqrec_fast
