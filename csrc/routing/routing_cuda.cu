// CUDA binding of capsule routing: routing_fwd_cuda / routing_bwd_cuda in seqrec_fast._C, with
// the signatures of routing_fwd_cpu / routing_bwd_cpu (routing_cpu.cpp). Checks every input,
// allocates outputs (and the kernels' workspace when their state does not fit on chip), and
// launches the framework-free kernels of routing_kernels.h on the current stream of u's device.
//
// u layouts (detected from u.dim()):
//   shared (MIND):          u (B, L, d), the same u_hat for every interest;
//   per_position (ComiRec): u (L, B, K, d), u_hat[b, k, l] = u[l, b, k].
// Element types: float32, bfloat16, float16 (fp32 accumulation); float64 is served by the
// 'cpp', 'triton' and 'eager' backends.
// Environment: SEQREC_FAST_ROUTING_CUDA_THREADS=<multiple of 32, <= 512> fixes the block size
// (tuning aid; default automatic).
//
// This file has no device code. Its body is hidden from nvcc's device pass (__CUDA_ARCH__), so
// the torch headers are parsed only for the host: that halves its compile time.
#ifdef SEQREC_FAST_WITH_CUDA
#ifndef __CUDA_ARCH__

#include <cstdlib>
#include <optional>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/registry.h"
#include "routing/routing_binding.h"
#include "routing/routing_kernels.h"

namespace seqrec_fast {
namespace {

using routing_binding::BackwardInputs;
using routing_binding::check_args;
using routing_binding::check_backward_inputs;
using routing_binding::check_forward_inputs;
using routing_binding::ForwardInputs;
using routing_binding::grad_u_strides;
using routing_binding::GradStrides;
using routing_binding::Layout;

namespace rk = routing_cuda;

rk::DType element_type(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat: return rk::DType::kFloat32;
    case at::kBFloat16: return rk::DType::kBFloat16;
    case at::kHalf: return rk::DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, name, " must be float32, bfloat16 or float16 for the cuda backend, got ", st,
              " (float64 runs on the 'cpp', 'triton' and 'eager' backends)");
  return rk::DType::kFloat32;
}

int threads_from_env() {
  const char* s = std::getenv("SEQREC_FAST_ROUTING_CUDA_THREADS");
  if (s == nullptr || *s == '\0') return 0;
  const int t = std::atoi(s);
  TORCH_CHECK(t >= 32 && t <= 512 && t % 32 == 0,
              "SEQREC_FAST_ROUTING_CUDA_THREADS must be a multiple of 32 in [32, 512], got '", s,
              "'");
  return t;
}

// The sizes, options and mask shared by the forward and backward launches.
rk::RoutingParams base_params(int64_t B, int64_t K, int64_t L, int64_t d, int64_t iters,
                              bool seq_axis, bool shared, const at::Tensor& mask,
                              bool seq_all) {
  rk::RoutingParams p;
  p.B = B;
  p.K = K;
  p.L = L;
  p.d = d;
  p.iters = iters;
  p.seq_axis = seq_axis || seq_all;
  p.seq_all = seq_all;
  p.shared = shared;
  p.mask = mask.data_ptr<bool>();
  p.mask_sb = mask.stride(0);
  return p;
}

// Plans, allocates the workspace if needed, and launches on the current stream.
void run(rk::Pass pass, rk::DType dt, rk::RoutingParams& p, const at::Device& dev,
         const char* what) {
  p.threads = threads_from_env();
  rk::RoutingPlan plan;
  cudaError_t err = rk::routing_cuda_plan(pass, dt, p, &plan);
  TORCH_CHECK(err == cudaSuccess, what, ": cannot plan the CUDA kernel (B=", p.B, ", K=", p.K,
              ", L=", p.L, ", d=", p.d, ", iters=", p.iters, "): ", cudaGetErrorString(err));
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    const int64_t words = int64_t((plan.workspace_bytes + 3) / 4);
    workspace = at::empty({words}, at::TensorOptions().device(dev).dtype(at::kFloat));
    p.workspace = workspace.data_ptr();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  err = rk::routing_cuda_launch(pass, dt, p, plan, stream);
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  // the workspace goes back to the caching allocator on this stream: reuse is stream-ordered
}

// u with its layout and the (float32) init_logits, for the passes that read them: the forward
// and the full backward.
void set_u_and_init(rk::RoutingParams& p, const at::Tensor& u, const Layout& lo,
                    const std::optional<at::Tensor>& init) {
  p.u = u.data_ptr();
  p.u_sb = lo.sb;
  p.u_sk = lo.sk;
  p.u_sl = lo.sl;
  if (init) {
    p.init = init->data_ptr<float>();
    p.init_sb = init->stride(0);
    p.init_sk = init->stride(1);
  }
}

// routing_fwd_cuda: the signature and outputs of routing_fwd_cpu (routing_cpu.cpp), except
// that c_last and s_last are always float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_fwd_cuda(
    const at::Tensor& u, const at::Tensor& mask, const std::optional<at::Tensor>& init_logits,
    int64_t num_interests, int64_t iters, bool seq_axis, bool seq_all) {
  check_args(num_interests, iters);
  TORCH_CHECK(u.is_cuda(), "u must be a CUDA tensor, got device ", u.device());
  const at::Device dev = u.device();
  const rk::DType dt = element_type(u.scalar_type(), "u");
  const c10::cuda::CUDAGuard guard(dev);
  // the kernels accumulate in float32: init_logits is handed over as float32
  const ForwardInputs in =
      check_forward_inputs(u, mask, init_logits, num_interests, dev, at::kFloat);
  const Layout& lo = in.lo;
  const std::optional<at::Tensor>& init = in.init;
  const int64_t B = lo.B, K = lo.K, L = lo.L, d = lo.d;

  at::Tensor v = at::empty({B, K, d}, u.options());
  at::Tensor c_last = at::empty({B, K, L}, u.options().dtype(at::kFloat));
  at::Tensor s_last = at::empty({B, K, d}, u.options().dtype(at::kFloat));
  if (B == 0) return {v, c_last, s_last};
  TORCH_CHECK(L >= 1 && d >= 1,
              "routing_fwd_cuda: u must have seq_len >= 1 and dim >= 1, got shape ", u.sizes());

  rk::RoutingParams p = base_params(B, K, L, d, iters, seq_axis, lo.shared, mask, seq_all);
  set_u_and_init(p, u, lo, init);
  p.v = v.data_ptr();
  p.c_last = c_last.data_ptr<float>();
  p.s_last = s_last.data_ptr<float>();
  run(rk::Pass::kForward, dt, p, dev, "routing_fwd_cuda");
  return {v, c_last, s_last};
}

// routing_bwd_cuda: the signature, inputs and output of routing_bwd_cpu (routing_cpu.cpp), with
// float32 c_last / s_last.
at::Tensor routing_bwd_cuda(const at::Tensor& grad_v_in, const std::optional<at::Tensor>& u_opt,
                            const at::Tensor& mask, const std::optional<at::Tensor>& init_logits,
                            const std::optional<at::Tensor>& c_last_opt,
                            const std::optional<at::Tensor>& s_last_opt, int64_t num_interests,
                            int64_t iters, bool seq_axis, bool detach, bool per_position,
                            bool seq_all) {
  check_args(num_interests, iters);
  TORCH_CHECK(grad_v_in.is_cuda(), "grad_v must be a CUDA tensor, got device ",
              grad_v_in.device());
  const at::Device dev = grad_v_in.device();
  const rk::DType dt = element_type(grad_v_in.scalar_type(), "grad_v");
  const c10::cuda::CUDAGuard guard(dev);
  const BackwardInputs in =
      check_backward_inputs(grad_v_in, u_opt, mask, init_logits, c_last_opt, s_last_opt,
                            num_interests, detach, per_position, dev, at::kFloat);
  const at::Tensor& grad_v = in.grad_v;
  const int64_t B = in.B, K = in.K, L = in.L, d = in.d;
  const Layout& lo = in.lo;
  const std::optional<at::Tensor>& init = in.init;

  at::Tensor grad_u = per_position ? at::empty({L, B, K, d}, grad_v.options())
                                   : at::empty({B, L, d}, grad_v.options());
  if (B == 0 || grad_u.numel() == 0) return grad_u;

  rk::RoutingParams p = base_params(B, K, L, d, iters, seq_axis, !per_position, mask, seq_all);
  p.grad_v = grad_v.data_ptr();
  p.grad_u = grad_u.data_ptr();
  const GradStrides gs = grad_u_strides(per_position, B, K, L, d);
  p.g_sb = gs.sb;
  p.g_sk = gs.sk;
  p.g_sl = gs.sl;
  if (detach) {
    p.c_in = in.c_last.data_ptr<float>();
    p.s_in = in.s_last.data_ptr<float>();
    run(rk::Pass::kBackwardDetached, dt, p, dev, "routing_bwd_cuda");
  } else {
    set_u_and_init(p, *u_opt, lo, init);
    run(rk::Pass::kBackwardFull, dt, p, dev, "routing_bwd_cuda");
  }
  return grad_u;
}

}  // namespace
}  // namespace seqrec_fast

static seqrec_fast::RegisterBindings reg_routing_cuda([](pybind11::module_& m) {
  using seqrec_fast::routing_bwd_cuda;
  using seqrec_fast::routing_fwd_cuda;
  m.def("routing_fwd_cuda", &routing_fwd_cuda,
        "Capsule routing forward on CUDA -> (v, c_last, s_last). u: (B, L, d) shared or "
        "(L, B, K, d) per_position, float32/bfloat16/float16; mask (B, L) bool; init_logits "
        "(B, K, L) or None.",
        pybind11::arg("u"), pybind11::arg("mask"), pybind11::arg("init_logits"),
        pybind11::arg("num_interests"), pybind11::arg("iters"), pybind11::arg("seq_axis"),
        pybind11::arg("seq_all") = false);
  m.def("routing_bwd_cuda", &routing_bwd_cuda,
        "Capsule routing backward on CUDA -> grad_u ((B, L, d) shared, (L, B, K, d) "
        "per_position).",
        pybind11::arg("grad_v"), pybind11::arg("u"), pybind11::arg("mask"),
        pybind11::arg("init_logits"), pybind11::arg("c_last"), pybind11::arg("s_last"),
        pybind11::arg("num_interests"), pybind11::arg("iters"), pybind11::arg("seq_axis"),
        pybind11::arg("detach"), pybind11::arg("per_position"), pybind11::arg("seq_all") = false);
});

#endif  // !__CUDA_ARCH__
#endif  // SEQREC_FAST_WITH_CUDA
