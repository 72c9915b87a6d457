// Input handling shared by the CPU (routing_cpu.cpp) and CUDA (routing_cuda.cu) bindings of
// the routing kernels: the two layouts of u_hat and the argument checks.
#pragma once
#include <torch/extension.h>

namespace seqrec_fast {
namespace routing_binding {

inline void check_inner_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
}

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

}  // namespace routing_binding
}  // namespace seqrec_fast
