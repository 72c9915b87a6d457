// CPU kernels of the full-catalog softmax cross-entropy (seqrec_fast.ops.linear_cross_entropy,
// backend "cpp"): linear_cross_entropy_fwd_cpu / _bwd_cpu in seqrec_fast._C.
//
// The catalog is processed in chunks of columns, so memory is O(B·chunk), never
// O(B·N) (chunk ≈ 2^18 / B columns, at least 256: a ~1 MB logits block that stays in cache):
//   forward:  per chunk  Z = U/T · W_cᵀ + b_c/T        (one ATen GEMM)
//                        lse = logaddexp(lse, logsumexp(Z, 1))
//             target logits gathered directly (B dot products); the label-smoothing term
//             Σ_j z_j = U/T · Σ_j w_j + Σ_j b_j/T needs no pass over the logits at all.
//   backward: per chunk  recompute Z, P = exp(Z - lse), dZ = g·(P - (1-ε)·onehot - ε/N)
//                        dW_c = dZᵀ · U/T (written once), dU += dZ · W_c, db_c = Σ_b dZ / T
// Parallelism: ONE at::parallel_for over the chunks; inside it every ATen op (GEMM included)
// runs single-threaded on the thread's own chunk, each thread keeps its own running lse / dU
// (n_threads × B [× d]) merged at the end. Many small parallel ops per chunk instead cost a
// thread barrier each and collapse on a busy machine.
// Element-wise work uses ATen ops on the chunk (their kernels pick AVX2/AVX-512 at run time,
// which an extension compiled for the baseline ISA could not). Everything is computed in
// float32 (float64 for float64 inputs, so gradcheck works); bf16/fp16 inputs are converted chunk
// by chunk. C++ rather than chunked eager Python: no per-chunk Python overhead and no GIL in
// the parallel region.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/checks.h"
#include "common/registry.h"

namespace seqrec_fast {
namespace {

struct Inputs {
  int64_t B, N, d;
  at::ScalarType acc;
};

Inputs check_inputs(const at::Tensor& user, const at::Tensor& items, const at::Tensor& target,
                    const std::optional<at::Tensor>& bias) {
  check_cpu(user, "user");
  check_cpu(items, "items");
  check_cpu(target, "target");
  TORCH_CHECK(user.dim() == 2, "user must be (B, d), got ", user.sizes());
  TORCH_CHECK(items.dim() == 2, "items must be (N, d), got ", items.sizes());
  TORCH_CHECK(is_float_type(user.scalar_type()), "user must be floating point, got ",
              user.scalar_type());
  TORCH_CHECK(items.scalar_type() == user.scalar_type(), "items dtype ", items.scalar_type(),
              " differs from user dtype ", user.scalar_type());
  const int64_t B = user.size(0), d = user.size(1), N = items.size(0);
  TORCH_CHECK(items.size(1) == d, "items must have d=", d, " columns, got ", items.sizes());
  TORCH_CHECK(N >= 1, "items must have at least one row");
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ",
              target.scalar_type());
  SEQREC_FAST_CHECK_SHAPE(target, B);
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    SEQREC_FAST_CHECK_SHAPE(*bias, N);
  }
  return {B, N, d, acc_dtype(user.scalar_type())};
}

// Columns per chunk: keeps the (B, chunk) logits block around 1 MB (in cache for the element-wise
// passes) and the GEMM wide enough to be efficient.
int64_t chunk_cols(int64_t B, int64_t N, int64_t chunk) {
  if (chunk <= 0) {
    const int64_t target_elems = int64_t(1) << 18;
    chunk = std::max<int64_t>(256, target_elems / std::max<int64_t>(B, 1));
    chunk = (chunk + 63) / 64 * 64;
  }
  return std::min(chunk, N);
}

struct Prepared {
  at::Tensor us;     // (B, d) user / T, acc dtype
  at::Tensor bs;     // (N,) bias / T, acc dtype, or undefined
  at::Tensor valid;  // (B,) bool, target != ignore_index
  at::Tensor safe_t; // (B,) int64, target with ignored rows -> 0
};

Prepared prepare(const at::Tensor& user, const at::Tensor& target,
                 const std::optional<at::Tensor>& bias, double temperature,
                 int64_t ignore_index, at::ScalarType acc) {
  Prepared p;
  const double inv_t = 1.0 / temperature;
  p.us = user.to(acc).mul(inv_t).contiguous();
  if (bias.has_value() && bias->defined()) p.bs = bias->to(acc).mul(inv_t).contiguous();
  p.valid = target.ne(ignore_index);
  p.safe_t = at::where(p.valid, target, at::zeros_like(target));
  return p;
}

// Z chunk = us · W_cᵀ + bs_c  (B, n)
at::Tensor chunk_logits(const Prepared& p, const at::Tensor& items, int64_t c0, int64_t n,
                        at::ScalarType acc, at::Tensor* wc_out) {
  at::Tensor wc = items.narrow(0, c0, n);
  if (wc.scalar_type() != acc) wc = wc.to(acc);
  if (wc_out) *wc_out = wc;
  if (p.bs.defined()) return at::addmm(p.bs.narrow(0, c0, n), p.us, wc.t());
  return at::mm(p.us, wc.t());
}

}  // namespace

// -> [loss_rows (B,), lse (B,)] in float32 (float64 for float64 inputs); loss 0 at ignored rows.
std::vector<at::Tensor> linear_cross_entropy_fwd_cpu(const at::Tensor& user_in,
                                                     const at::Tensor& items_in,
                                                     const at::Tensor& target,
                                                     const std::optional<at::Tensor>& bias,
                                                     double temperature, int64_t ignore_index,
                                                     double label_smoothing, int64_t chunk) {
  at::NoGradGuard no_grad;  // called directly or below autograd: never record a graph
  // detached views: OpenMP workers do not inherit the grad mode / dispatch exclusions
  const at::Tensor user = user_in.detach(), items = items_in.detach();
  const Inputs in = check_inputs(user, items, target, bias);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const auto acc = in.acc;
  const Prepared p = prepare(user, target, bias, temperature, ignore_index, acc);
  const int64_t n_chunk = chunk_cols(in.B, in.N, chunk);
  const int64_t n_chunks = (in.N + n_chunk - 1) / n_chunk;
  // One parallel region over chunks (each thread: its own chunks, single-threaded GEMM and
  // element-wise ops, its own running lse) instead of many small parallel ops per chunk.
  const int64_t n_threads = at::get_num_threads();
  at::Tensor lse_t = at::full({n_threads, in.B}, -std::numeric_limits<double>::infinity(),
                              user.options().dtype(acc));
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor lse = lse_t[at::get_thread_num()];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * n_chunk, n = std::min(n_chunk, in.N - c0);
      at::Tensor z = chunk_logits(p, items, c0, n, acc, nullptr);
      at::Tensor mx = z.amax(1);
      z.sub_(mx.unsqueeze(1)).exp_();
      lse.copy_(at::logaddexp(lse, z.sum(1).log_().add_(mx)));
    }
  });
  at::Tensor lse = at::logsumexp(lse_t, {0});
  // target logit gathered directly
  at::Tensor wt = items.index_select(0, p.safe_t).to(acc);
  at::Tensor zt = (p.us * wt).sum(1);
  if (p.bs.defined()) zt.add_(p.bs.index_select(0, p.safe_t));
  at::Tensor loss = lse - (1.0 - label_smoothing) * zt;
  if (label_smoothing > 0) {  // Σ_j z_j = us · Σ_j w_j + Σ_j b_j / T: no pass over logits
    at::Tensor sz = at::mv(p.us, at::sum(items, {0}, false, acc));
    if (p.bs.defined()) sz.add_(p.bs.sum());
    loss.sub_(sz.mul_(label_smoothing / static_cast<double>(in.N)));
  }
  loss = at::where(p.valid, loss, at::zeros_like(loss));
  return {loss, lse};
}

namespace {
// dz[b, t_b - c0] -= gt[b] for the rows whose target lies in [c0, c0 + n); order: (target, row)
// pairs sorted by target, so a chunk visits only its own rows.
template <typename T>
void subtract_onehot(at::Tensor& dz, int64_t c0, int64_t n,
                     const std::vector<std::pair<int64_t, int64_t>>& order, const T* gt) {
  T* z = dz.data_ptr<T>();
  const int64_t ld = dz.stride(0);
  auto it = std::lower_bound(order.begin(), order.end(), std::make_pair(c0, int64_t(-1)));
  for (; it != order.end() && it->first < c0 + n; ++it) z[it->second * ld + (it->first - c0)] -= gt[it->second];
}
}  // namespace

// -> [d_user (B, d) | (0, d), d_items (N, d) | (0, d), d_bias (N,) | (0,)] in the input dtypes.
std::vector<at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& user_in, const at::Tensor& items_in,
    const at::Tensor& target, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    double temperature, int64_t ignore_index, double label_smoothing, bool need_user,
    bool need_items, bool need_bias, int64_t chunk) {
  at::NoGradGuard no_grad;  // called directly or below autograd: never record a graph
  // detached views: OpenMP workers do not inherit the grad mode / dispatch exclusions
  const at::Tensor user = user_in.detach(), items = items_in.detach();
  const Inputs in = check_inputs(user, items, target, bias);
  check_cpu(grad_rows, "grad_rows");
  check_cpu(lse, "lse");
  SEQREC_FAST_CHECK_SHAPE(grad_rows, in.B);
  SEQREC_FAST_CHECK_SHAPE(lse, in.B);
  const bool has_bias = bias.has_value() && bias->defined();
  need_bias = need_bias && has_bias;
  const auto acc = in.acc;
  at::Tensor d_items = need_items ? at::empty({in.N, in.d}, items.options())
                                  : at::empty({0, in.d}, items.options());
  at::Tensor d_bias = need_bias ? at::empty({in.N}, bias->options()) : at::empty({0}, items.options());
  if (!need_user && !need_items && !need_bias) return {at::empty({0, in.d}, user.options()), d_items, d_bias};
  const Prepared p = prepare(user, target, bias, temperature, ignore_index, acc);
  const double inv_t = 1.0 / temperature;
  const double eps_n = label_smoothing / static_cast<double>(in.N);
  // g_b = dloss_b, 0 at ignored rows; column vectors for broadcasting over a chunk
  const at::Tensor g = at::where(p.valid, grad_rows.to(acc), at::zeros({}, lse.options().dtype(acc)));
  const at::Tensor g_col = g.unsqueeze(1);
  const at::Tensor lse_col = lse.to(acc).unsqueeze(1).contiguous();
  const at::Tensor gt = g.mul(1.0 - label_smoothing).contiguous();  // onehot weight per row
  std::vector<std::pair<int64_t, int64_t>> order;
  {
    const at::Tensor tc = target.contiguous();
    const int64_t* t = tc.data_ptr<int64_t>();
    order.reserve(in.B);
    for (int64_t b = 0; b < in.B; ++b)
      if (t[b] != ignore_index) order.emplace_back(t[b], b);
    std::sort(order.begin(), order.end());
  }
  const bool direct_items = need_items && items.scalar_type() == acc && d_items.is_contiguous();
  const int64_t n_chunk = chunk_cols(in.B, in.N, chunk);
  const int64_t n_chunks = (in.N + n_chunk - 1) / n_chunk;
  const int64_t n_threads = at::get_num_threads();
  at::Tensor du_t;
  if (need_user) du_t = at::zeros({n_threads, in.B, in.d}, user.options().dtype(acc));
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor du;
    if (need_user) du = du_t[at::get_thread_num()];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * n_chunk, n = std::min(n_chunk, in.N - c0);
      at::Tensor wc;
      at::Tensor dz = chunk_logits(p, items, c0, n, acc, &wc);
      dz.sub_(lse_col).exp_();
      if (eps_n > 0) dz.sub_(eps_n);
      dz.mul_(g_col);
      AT_DISPATCH_FLOATING_TYPES(acc, "lce_onehot", [&] {
        subtract_onehot<scalar_t>(dz, c0, n, order, gt.data_ptr<scalar_t>());
      });
      if (direct_items) {
        at::Tensor out = d_items.narrow(0, c0, n);
        at::mm_out(out, dz.t(), p.us);
      } else if (need_items) {
        d_items.narrow(0, c0, n).copy_(at::mm(dz.t(), p.us));
      }
      if (need_user) du.addmm_(dz, wc);
      if (need_bias) d_bias.narrow(0, c0, n).copy_(dz.sum(0).mul_(inv_t));
    }
  });
  at::Tensor d_user = need_user ? du_t.sum(0).mul_(inv_t).to(user.scalar_type())
                                : at::empty({0, in.d}, user.options());
  return {d_user, d_items, d_bias};
}

}  // namespace seqrec_fast

static seqrec_fast::RegisterBindings linear_cross_entropy_bindings([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("linear_cross_entropy_fwd_cpu", &seqrec_fast::linear_cross_entropy_fwd_cpu,
        "Full-catalog softmax CE forward on CPU, chunked over the catalog -> [loss_rows, lse] "
        "(float32, float64 for float64 inputs). user (B, d), items (N, d), target (B,) int64, "
        "bias (N,) or None; chunk <= 0 picks the chunk width.",
        py::arg("user"), py::arg("items"), py::arg("target"), py::arg("bias"),
        py::arg("temperature"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("chunk") = 0);
  m.def("linear_cross_entropy_bwd_cpu", &seqrec_fast::linear_cross_entropy_bwd_cpu,
        "Full-catalog softmax CE backward on CPU -> [d_user | (0, d), d_items | (0, d), "
        "d_bias | (0,)] in the input dtypes.",
        py::arg("grad_rows"), py::arg("user"), py::arg("items"), py::arg("target"),
        py::arg("bias"), py::arg("lse"), py::arg("temperature"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("need_user"), py::arg("need_items"),
        py::arg("need_bias"), py::arg("chunk") = 0);
});
