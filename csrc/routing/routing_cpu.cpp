// CPU binding of capsule routing: routing_fwd_cpu / routing_bwd_cpu in seqrec_fast._C.
// The per-row math is in routing_core.h; this file checks inputs, allocates outputs, and runs the
// rows in parallel (at::parallel_for over the batch, one scratch buffer per chunk).
//
// u layouts (detected from u.dim()):
//   shared (MIND):          u (B, L, d), the same u_hat for every interest;
//   per_position (ComiRec): u (L, B, K, d), u_hat[b, k, l] = u[l, b, k].
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/checks.h"
#include "common/registry.h"
#include "routing/routing_binding.h"
#include "routing/routing_core.h"

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

namespace rc = routing;

// grad_u of ComiRec-DR is a (L, B, K, d) tensor of tens of MB per step; a fresh one costs as much
// in first-touch page faults (about 10 ms for 52 MB here) as the routing backward itself. The
// last large grad_u buffer (>= 4 MiB) is therefore kept and its storage handed out again, in a
// new tensor (not a view), once nothing but this cache refers to it (the previous step's
// gradient is gone); otherwise a new buffer is allocated and cached instead. The kernels write
// every element of grad_u, so a reused buffer's old contents never show. The price is that one
// grad_u stays allocated between steps; SEQREC_FAST_REUSE_WORKSPACE=0 (read once) turns it off.
std::mutex workspace_mu;
at::Tensor workspace;  // the cache's own handle: never returned

at::Tensor reusable_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  constexpr int64_t kMinBytes = int64_t(1) << 22;
  static const bool enabled = [] {
    const char* v = std::getenv("SEQREC_FAST_REUSE_WORKSPACE");
    return v == nullptr || std::string(v) != "0";
  }();
  const int64_t numel = c10::multiply_integers(shape);
  if (!enabled ||
      numel * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType())) < kMinBytes)
    return at::empty(shape, opts);
  at::Tensor& cached = workspace;
  std::lock_guard<std::mutex> lock(workspace_mu);
  if (!(cached.defined() && cached.use_count() == 1 && cached.storage().use_count() == 1 &&
        cached.scalar_type() == opts.dtype().toScalarType() && cached.numel() == numel &&
        cached.device() == opts.device())) {
    cached = at::empty({numel}, opts);
  }
  std::vector<int64_t> strides(shape.size());
  int64_t st = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = st;
    st *= shape[i];
  }
  at::Tensor out = at::empty({0}, opts);
  out.set_(cached.storage(), 0, shape, strides);
  return out;
}

rc::Dims dims(int64_t K, int64_t L, int64_t d, int64_t iters, bool seq_axis, bool shared,
            bool seq_all) {
  rc::Dims D;
  D.K = K;
  D.L = L;
  D.d = d;
  D.iters = iters;
  D.seq_axis = seq_axis || seq_all;
  D.seq_all = seq_all;
  D.shared = shared;
  return D;
}

// Rows per parallel chunk: at least enough work to be worth a thread.
int64_t grain_size(int64_t K, int64_t L, int64_t d) {
  const int64_t work = std::max<int64_t>(1, K * L * d);
  return std::max<int64_t>(1, 16384 / work);
}

// routing_fwd_cpu(u, mask, init_logits, num_interests, iters, seq_axis, seq_all=false)
//   -> (v, c_last, s_last)
//   v (B, K, d) u.dtype; c_last (B, K, L), s_last (B, K, d) float32 (float64 for float64 u).
//   seq_all: the sequence softmax over all L positions, padded ones included (torch-rechub).
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_fwd_cpu(
    const at::Tensor& u, const at::Tensor& mask, const std::optional<at::Tensor>& init_logits,
    int64_t num_interests, int64_t iters, bool seq_axis, bool seq_all) {
  check_args(num_interests, iters);
  check_cpu(u, "u");
  TORCH_CHECK(is_float_type(u.scalar_type()),
              "u must be float32, float64, bfloat16 or float16, got ", u.scalar_type());
  const at::ScalarType acc = acc_dtype(u.scalar_type());
  const ForwardInputs in =
      check_forward_inputs(u, mask, init_logits, num_interests, at::Device(at::kCPU), acc);
  const Layout& lo = in.lo;
  const std::optional<at::Tensor>& init = in.init;
  const int64_t B = lo.B, K = lo.K, L = lo.L, d = lo.d;

  at::Tensor v = at::empty({B, K, d}, u.options());
  at::Tensor c_last = at::empty({B, K, L}, u.options().dtype(acc));
  at::Tensor s_last = at::empty({B, K, d}, u.options().dtype(acc));
  if (B == 0) return {v, c_last, s_last};

  const rc::Dims D = dims(K, L, d, iters, seq_axis, lo.shared, seq_all);
  const int64_t mask_sb = mask.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "routing_fwd_cpu",
                                  [&] {
    using T = scalar_t;
    using A = rc::acc_t<T>;
    const T* u_p = u.data_ptr<T>();
    const bool* m_p = mask.data_ptr<bool>();
    const A* i_p = init ? init->data_ptr<A>() : nullptr;
    const int64_t i_sb = init ? init->stride(0) : 0, i_sk = init ? init->stride(1) : 0;
    T* v_p = v.data_ptr<T>();
    A* c_p = c_last.data_ptr<A>();
    A* s_p = s_last.data_ptr<A>();
    at::parallel_for(0, B, grain_size(K, L, d), [&](int64_t b0, int64_t b1) {
      std::vector<A> ws(rc::fwd_scratch_elems<T>(D));
      std::vector<int32_t> idx(rc::idx_elems(D));
      for (int64_t b = b0; b < b1; ++b) {
        rc::routing_fwd_row<T>(D, u_p + b * lo.sb, lo.sk, lo.sl, m_p + b * mask_sb,
                               i_p ? i_p + b * i_sb : nullptr, i_sk, v_p + b * K * d,
                               c_p + b * K * L, s_p + b * K * d, ws.data(), idx.data());
      }
    });
  });
  return {v, c_last, s_last};
}

// routing_bwd_cpu(grad_v, u, mask, init_logits, c_last, s_last, num_interests, iters, seq_axis,
//                 detach, per_position, seq_all=false) -> grad_u
//   grad_v (B, K, d); grad_u in grad_v's dtype: (B, L, d) shared (summed over interests) or
//   (L, B, K, d) per_position. detach: u, init_logits unused (may be None), c_last / s_last from
//   the forward required. Not detach: u (same dtype as grad_v) required, c_last / s_last unused.
at::Tensor routing_bwd_cpu(const at::Tensor& grad_v_in, const std::optional<at::Tensor>& u_opt,
                           const at::Tensor& mask, const std::optional<at::Tensor>& init_logits,
                           const std::optional<at::Tensor>& c_last_opt,
                           const std::optional<at::Tensor>& s_last_opt, int64_t num_interests,
                           int64_t iters, bool seq_axis, bool detach, bool per_position,
                           bool seq_all) {
  check_args(num_interests, iters);
  check_cpu(grad_v_in, "grad_v");
  TORCH_CHECK(is_float_type(grad_v_in.scalar_type()),
              "grad_v must be float32, float64, bfloat16 or float16, got ",
              grad_v_in.scalar_type());
  const at::ScalarType acc = acc_dtype(grad_v_in.scalar_type());
  const BackwardInputs in =
      check_backward_inputs(grad_v_in, u_opt, mask, init_logits, c_last_opt, s_last_opt,
                            num_interests, detach, per_position, at::Device(at::kCPU), acc);
  const at::Tensor& grad_v = in.grad_v;
  const int64_t B = in.B, K = in.K, L = in.L, d = in.d;
  const Layout& lo = in.lo;
  const std::optional<at::Tensor>& init = in.init;

  at::Tensor grad_u = per_position ? reusable_empty({L, B, K, d}, grad_v.options())
                                   : reusable_empty({B, L, d}, grad_v.options());
  if (B == 0 || grad_u.numel() == 0) return grad_u;
  const GradStrides gs = grad_u_strides(per_position, B, K, L, d);

  const rc::Dims D = dims(K, L, d, iters, seq_axis, !per_position, seq_all);
  const int64_t mask_sb = mask.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_v.scalar_type(),
                                  "routing_bwd_cpu", [&] {
    using T = scalar_t;
    using A = rc::acc_t<T>;
    const T* gv_p = grad_v.data_ptr<T>();
    const bool* m_p = mask.data_ptr<bool>();
    T* o_p = grad_u.data_ptr<T>();
    if (detach) {
      const A* c_p = in.c_last.data_ptr<A>();
      const A* s_p = in.s_last.data_ptr<A>();
      at::parallel_for(0, B, grain_size(K, L, d), [&](int64_t b0, int64_t b1) {
        std::vector<A> ws(rc::bwd_scratch_elems<T>(D, true));
        for (int64_t b = b0; b < b1; ++b) {
          rc::routing_bwd_detached_row<T>(D, gv_p + b * K * d, m_p + b * mask_sb,
                                          c_p + b * K * L, s_p + b * K * d, o_p + b * gs.sb,
                                          gs.sk, gs.sl, ws.data());
        }
      });
    } else {
      const T* u_p = u_opt->data_ptr<T>();
      const A* i_p = init ? init->data_ptr<A>() : nullptr;
      const int64_t i_sb = init ? init->stride(0) : 0, i_sk = init ? init->stride(1) : 0;
      at::parallel_for(0, B, grain_size(K, L, d), [&](int64_t b0, int64_t b1) {
        std::vector<A> ws(rc::bwd_scratch_elems<T>(D, false));
        std::vector<int32_t> idx(rc::idx_elems(D));
        for (int64_t b = b0; b < b1; ++b) {
          rc::routing_bwd_full_row<T>(D, gv_p + b * K * d, u_p + b * lo.sb, lo.sk, lo.sl,
                                      m_p + b * mask_sb, i_p ? i_p + b * i_sb : nullptr, i_sk,
                                      o_p + b * gs.sb, gs.sk, gs.sl, ws.data(), idx.data());
        }
      });
    }
  });
  return grad_u;
}

// Bytes held by the reusable grad_u buffer (0 when none); release=true drops it.
int64_t routing_workspace_cpu(bool release) {
  std::lock_guard<std::mutex> lock(workspace_mu);
  const int64_t n = workspace.defined() ? workspace.nbytes() : 0;
  if (release) workspace = at::Tensor();
  return n;
}

}  // namespace
}  // namespace seqrec_fast

static seqrec_fast::RegisterBindings reg([](pybind11::module_& m) {
  using seqrec_fast::routing_bwd_cpu;
  using seqrec_fast::routing_fwd_cpu;
  m.def("routing_workspace_cpu", &seqrec_fast::routing_workspace_cpu,
        "Bytes held by the C++ routing backward's reusable grad_u buffer; release=True frees it.",
        pybind11::arg("release") = false);
  m.def("routing_fwd_cpu", &routing_fwd_cpu,
        "Capsule routing forward on CPU -> (v, c_last, s_last). u: (B, L, d) shared or "
        "(L, B, K, d) per_position; mask (B, L) bool; init_logits (B, K, L) or None.",
        pybind11::arg("u"), pybind11::arg("mask"), pybind11::arg("init_logits"),
        pybind11::arg("num_interests"), pybind11::arg("iters"), pybind11::arg("seq_axis"),
        pybind11::arg("seq_all") = false);
  m.def("routing_bwd_cpu", &routing_bwd_cpu,
        "Capsule routing backward on CPU -> grad_u ((B, L, d) shared, (L, B, K, d) "
        "per_position).",
        pybind11::arg("grad_v"), pybind11::arg("u"), pybind11::arg("mask"),
        pybind11::arg("init_logits"), pybind11::arg("c_last"), pybind11::arg("s_last"),
        pybind11::arg("num_interests"), pybind11::arg("iters"), pybind11::arg("seq_axis"),
        pybind11::arg("detach"), pybind11::arg("per_position"), pybind11::arg("seq_all") = false);
});
