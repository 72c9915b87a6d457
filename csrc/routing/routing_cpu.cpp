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

#include "common/registry.h"
#include "routing/routing_binding.h"
#include "routing/routing_core.h"

namespace seqrec_fast {
namespace {

using routing_binding::check_args;
using routing_binding::bwd_u_layout;
using routing_binding::check_inner_stride;
using routing_binding::Layout;
using routing_binding::u_layout;

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

rc::Dims dims(int64_t K, int64_t L, int64_t d, int64_t iters, bool seq_axis, bool shared) {
  rc::Dims D;
  D.K = K;
  D.L = L;
  D.d = d;
  D.iters = iters;
  D.seq_axis = seq_axis;
  D.shared = shared;
  return D;
}

// Rows per parallel chunk: at least enough work to be worth a thread.
int64_t grain_size(int64_t K, int64_t L, int64_t d) {
  const int64_t work = std::max<int64_t>(1, K * L * d);
  return std::max<int64_t>(1, 16384 / work);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}


bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

at::ScalarType acc_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// mask (B, L) bool
void check_mask(const at::Tensor& mask, int64_t B, int64_t L) {
  check_cpu(mask, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ",
              mask.scalar_type());
  SEQREC_FAST_CHECK_SHAPE(mask, B, L);
  check_inner_stride(mask, "mask");
}

// init_logits (B, K, L) float32 / float64, or None; returned in the accumulation dtype.
std::optional<at::Tensor> prepare_init(const std::optional<at::Tensor>& init_opt, int64_t B,
                                       int64_t K, int64_t L, at::ScalarType acc) {
  if (!init_opt.has_value() || !init_opt->defined()) return std::nullopt;
  const at::Tensor& init_logits = *init_opt;
  check_cpu(init_logits, "init_logits");
  TORCH_CHECK(init_logits.scalar_type() == at::kFloat || init_logits.scalar_type() == at::kDouble,
              "init_logits must be float32 or float64, got ", init_logits.scalar_type());
  SEQREC_FAST_CHECK_SHAPE(init_logits, B, K, L);
  check_inner_stride(init_logits, "init_logits");
  if (init_logits.scalar_type() == acc) return init_logits;
  return init_logits.to(acc);
}


// routing_fwd_cpu(u, mask, init_logits, num_interests, iters, seq_axis) -> (v, c_last, s_last)
//   v (B, K, d) u.dtype; c_last (B, K, L), s_last (B, K, d) float32 (float64 for float64 u).
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_fwd_cpu(
    const at::Tensor& u, const at::Tensor& mask, const std::optional<at::Tensor>& init_logits,
    int64_t num_interests, int64_t iters, bool seq_axis) {
  check_args(num_interests, iters);
  check_cpu(u, "u");
  TORCH_CHECK(is_float_type(u.scalar_type()),
              "u must be float32, float64, bfloat16 or float16, got ", u.scalar_type());
  check_inner_stride(u, "u");
  const Layout lo = u_layout(u, num_interests);
  const int64_t B = lo.B, K = lo.K, L = lo.L, d = lo.d;
  check_mask(mask, B, L);
  const at::ScalarType acc = acc_dtype(u.scalar_type());
  const std::optional<at::Tensor> init = prepare_init(init_logits, B, K, L, acc);

  at::Tensor v = at::empty({B, K, d}, u.options());
  at::Tensor c_last = at::empty({B, K, L}, u.options().dtype(acc));
  at::Tensor s_last = at::empty({B, K, d}, u.options().dtype(acc));
  if (B == 0) return {v, c_last, s_last};

  const rc::Dims D = dims(K, L, d, iters, seq_axis, lo.shared);
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
      std::vector<int32_t> idx(static_cast<size_t>(L) + 1);
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
//                 detach, per_position) -> grad_u
//   grad_v (B, K, d); grad_u in grad_v's dtype: (B, L, d) shared (summed over interests) or
//   (L, B, K, d) per_position. detach: u, init_logits unused (may be None), c_last / s_last from
//   the forward required. Not detach: u (same dtype as grad_v) required, c_last / s_last unused.
at::Tensor routing_bwd_cpu(const at::Tensor& grad_v_in, const std::optional<at::Tensor>& u_opt,
                           const at::Tensor& mask, const std::optional<at::Tensor>& init_logits,
                           const std::optional<at::Tensor>& c_last_opt,
                           const std::optional<at::Tensor>& s_last_opt, int64_t num_interests,
                           int64_t iters, bool seq_axis, bool detach, bool per_position) {
  check_args(num_interests, iters);
  check_cpu(grad_v_in, "grad_v");
  TORCH_CHECK(is_float_type(grad_v_in.scalar_type()),
              "grad_v must be float32, float64, bfloat16 or float16, got ",
              grad_v_in.scalar_type());
  TORCH_CHECK(grad_v_in.dim() == 3, "grad_v must be (B, K, d), got shape ", grad_v_in.sizes());
  const at::Tensor grad_v = grad_v_in.contiguous();
  const int64_t B = grad_v.size(0), K = num_interests, d = grad_v.size(2);
  TORCH_CHECK(grad_v.size(1) == K, "grad_v must be (B, K, d) with K = num_interests = ", K,
              ", got shape ", grad_v.sizes());
  check_cpu(mask, "mask");
  TORCH_CHECK(mask.dim() == 2, "mask must be (B, L), got shape ", mask.sizes());
  const int64_t L = mask.size(1);
  check_mask(mask, B, L);
  const at::ScalarType dt = grad_v.scalar_type();
  const at::ScalarType acc = acc_dtype(dt);

  const bool have_u = u_opt.has_value() && u_opt->defined();
  Layout lo{};
  if (have_u) {
    const at::Tensor& u = *u_opt;
    check_cpu(u, "u");
    TORCH_CHECK(u.scalar_type() == dt, "u must have grad_v's dtype ", dt, ", got ",
                u.scalar_type());
    lo = bwd_u_layout(u, per_position, B, K, L, d);
  }
  TORCH_CHECK(detach || have_u, "u is required when detach is false");

  at::Tensor c_last, s_last;
  if (detach) {
    TORCH_CHECK(c_last_opt.has_value() && c_last_opt->defined(),
                "c_last is required when detach is true");
    TORCH_CHECK(s_last_opt.has_value() && s_last_opt->defined(),
                "s_last is required when detach is true");
    c_last = *c_last_opt;
    s_last = *s_last_opt;
    check_cpu(c_last, "c_last");
    check_cpu(s_last, "s_last");
    TORCH_CHECK(c_last.scalar_type() == acc, "c_last must be ", acc, ", got ",
                c_last.scalar_type());
    TORCH_CHECK(s_last.scalar_type() == acc, "s_last must be ", acc, ", got ",
                s_last.scalar_type());
    SEQREC_FAST_CHECK_SHAPE(c_last, B, K, L);
    SEQREC_FAST_CHECK_SHAPE(s_last, B, K, d);
    c_last = c_last.contiguous();
    s_last = s_last.contiguous();
  }
  const std::optional<at::Tensor> init =
      detach ? std::nullopt : prepare_init(init_logits, B, K, L, acc);

  at::Tensor grad_u = per_position ? reusable_empty({L, B, K, d}, grad_v.options())
                                   : reusable_empty({B, L, d}, grad_v.options());
  if (B == 0 || grad_u.numel() == 0) return grad_u;
  // grad_u row b: per_position out(k, l) = base + b*K*d + k*d + l*B*K*d; shared l*d.
  const int64_t o_sb = per_position ? K * d : L * d;
  const int64_t o_sk = per_position ? d : 0;
  const int64_t o_sl = per_position ? B * K * d : d;

  const rc::Dims D = dims(K, L, d, iters, seq_axis, !per_position);
  const int64_t mask_sb = mask.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "routing_bwd_cpu", [&] {
    using T = scalar_t;
    using A = rc::acc_t<T>;
    const T* gv_p = grad_v.data_ptr<T>();
    const bool* m_p = mask.data_ptr<bool>();
    T* o_p = grad_u.data_ptr<T>();
    if (detach) {
      const A* c_p = c_last.data_ptr<A>();
      const A* s_p = s_last.data_ptr<A>();
      at::parallel_for(0, B, grain_size(K, L, d), [&](int64_t b0, int64_t b1) {
        std::vector<A> ws(rc::bwd_scratch_elems<T>(D, true));
        for (int64_t b = b0; b < b1; ++b) {
          rc::routing_bwd_detached_row<T>(D, gv_p + b * K * d, m_p + b * mask_sb,
                                          c_p + b * K * L, s_p + b * K * d, o_p + b * o_sb,
                                          o_sk, o_sl, ws.data());
        }
      });
    } else {
      const T* u_p = u_opt->data_ptr<T>();
      const A* i_p = init ? init->data_ptr<A>() : nullptr;
      const int64_t i_sb = init ? init->stride(0) : 0, i_sk = init ? init->stride(1) : 0;
      at::parallel_for(0, B, grain_size(K, L, d), [&](int64_t b0, int64_t b1) {
        std::vector<A> ws(rc::bwd_scratch_elems<T>(D, false));
        std::vector<int32_t> idx(static_cast<size_t>(L) + 1);
        for (int64_t b = b0; b < b1; ++b) {
          rc::routing_bwd_full_row<T>(D, gv_p + b * K * d, u_p + b * lo.sb, lo.sk, lo.sl,
                                      m_p + b * mask_sb, i_p ? i_p + b * i_sb : nullptr, i_sk,
                                      o_p + b * o_sb, o_sk, o_sl, ws.data(), idx.data());
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
        pybind11::arg("num_interests"), pybind11::arg("iters"), pybind11::arg("seq_axis"));
  m.def("routing_bwd_cpu", &routing_bwd_cpu,
        "Capsule routing backward on CPU -> grad_u ((B, L, d) shared, (L, B, K, d) "
        "per_position).",
        pybind11::arg("grad_v"), pybind11::arg("u"), pybind11::arg("mask"),
        pybind11::arg("init_logits"), pybind11::arg("c_last"), pybind11::arg("s_last"),
        pybind11::arg("num_interests"), pybind11::arg("iters"), pybind11::arg("seq_axis"),
        pybind11::arg("detach"), pybind11::arg("per_position"));
});
