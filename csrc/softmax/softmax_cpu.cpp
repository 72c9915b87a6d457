// CPU kernels of the catalog-scale softmax losses (seqrec_fast._C):
//   linear_cross_entropy_fwd_cpu / _bwd_cpu   full-catalog softmax cross-entropy
//   sampled_softmax_fwd_cpu / _bwd_cpu        sampled softmax (logQ, in-batch, hit removal)
//
// Full catalog: the catalog is processed in chunks of columns, so memory is O(B·chunk), never
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
#include <utility>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/registry.h"

namespace seqrec_fast {
namespace {

void check_cpu_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

at::ScalarType acc_type_of(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

struct Inputs {
  int64_t B, N, d;
  at::ScalarType acc;
};

Inputs check_inputs(const at::Tensor& user, const at::Tensor& items, const at::Tensor& target,
                    const std::optional<at::Tensor>& bias) {
  check_cpu_tensor(user, "user");
  check_cpu_tensor(items, "items");
  check_cpu_tensor(target, "target");
  TORCH_CHECK(user.dim() == 2, "user must be (B, d), got ", user.sizes());
  TORCH_CHECK(items.dim() == 2, "items must be (N, d), got ", items.sizes());
  TORCH_CHECK(is_float_dtype(user.scalar_type()), "user must be floating point, got ",
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
    check_cpu_tensor(*bias, "bias");
    SEQREC_FAST_CHECK_SHAPE(*bias, N);
  }
  return {B, N, d, acc_type_of(user.scalar_type())};
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
  check_cpu_tensor(grad_rows, "grad_rows");
  check_cpu_tensor(lse, "lse");
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

// ---------------------------------------------------------------------------------------------
// Sampled softmax (CPU). Candidates of row b: its positive, the shared columns (the in-batch
// targets, then shared negatives (S,)) and/or its own negatives (B, S). Logit = u·w/T - logQ;
// accidental hits (a candidate other than the positive with id == target[b]) and the in-batch
// diagonal are masked to -inf, i.e. removed from the partition sum. Chunked like the full
// catalog: memory O(B·chunk) for shared columns and O(B·chunk·d) for per-row negatives; one
// parallel region per candidate kind, per-thread lse / dU. Item gradients of a chunk are
// complete over the batch: the shared columns' (C, d) are scatter-added once after the parallel
// region (deterministic); per-row negatives' are scatter-added per chunk under a mutex (ids
// repeat across chunks), so there the summation order of repeated ids may vary between runs
// (last-bit differences only).
// ---------------------------------------------------------------------------------------------
namespace {

struct SampledPlan {
  at::Tensor us;        // (B, d) user / T, acc dtype
  at::Tensor wpos;      // (B, d) items[target], acc dtype
  at::Tensor zpos;      // (B,) positive logits
  at::Tensor col_ids;   // (C,) shared column ids or undefined
  at::Tensor col_off;   // (C,) logQ of the shared columns or undefined
  at::Tensor row_neg;   // (B, S) per-row negatives or undefined
  at::Tensor row_off;   // (B, S) their logQ or undefined
  int64_t n_inbatch = 0;  // the first n_inbatch shared columns are the in-batch targets
};

SampledPlan sampled_plan(const at::Tensor& user, const at::Tensor& items, const at::Tensor& target,
                         const at::Tensor& negatives, const std::optional<at::Tensor>& log_q,
                         const std::optional<at::Tensor>& target_log_q, bool in_batch,
                         double temperature, at::ScalarType acc) {
  check_cpu_tensor(user, "user");
  check_cpu_tensor(items, "items");
  check_cpu_tensor(target, "target");
  check_cpu_tensor(negatives, "negatives");
  TORCH_CHECK(user.dim() == 2 && items.dim() == 2 && items.size(1) == user.size(1),
              "user (B, d) and items (N, d) expected, got ", user.sizes(), " and ", items.sizes());
  TORCH_CHECK(items.scalar_type() == user.scalar_type(), "items and user dtypes differ");
  TORCH_CHECK(target.scalar_type() == at::kLong && negatives.scalar_type() == at::kLong,
              "target and negatives must be int64");
  const int64_t B = user.size(0);
  SEQREC_FAST_CHECK_SHAPE(target, B);
  TORCH_CHECK(negatives.dim() == 1 || (negatives.dim() == 2 && negatives.size(0) == B),
              "negatives must be (S,) or (B, S), got ", negatives.sizes());
  const bool has_lq = log_q.has_value() && log_q->defined();
  const bool has_tlq = target_log_q.has_value() && target_log_q->defined();
  if (has_lq) TORCH_CHECK(log_q->sizes() == negatives.sizes(), "log_q must match negatives");
  if (has_tlq) SEQREC_FAST_CHECK_SHAPE(*target_log_q, B);
  SampledPlan p;
  p.us = user.to(acc).mul(1.0 / temperature).contiguous();
  p.wpos = items.index_select(0, target).to(acc);
  p.zpos = (p.us * p.wpos).sum(1);
  at::Tensor tlq = has_tlq ? target_log_q->to(acc) : at::Tensor();
  if (has_tlq) p.zpos.sub_(tlq);
  std::vector<at::Tensor> ids, offs;
  const bool shared_neg = negatives.dim() == 1;
  const bool shared_off = has_tlq || (has_lq && shared_neg);
  auto zeros = [&](int64_t n) { return at::zeros({n}, user.options().dtype(acc)); };
  if (in_batch) {
    ids.push_back(target);
    if (shared_off) offs.push_back(has_tlq ? tlq : zeros(B));
    p.n_inbatch = B;
  }
  if (shared_neg) {
    ids.push_back(negatives);
    if (shared_off) offs.push_back(has_lq ? log_q->to(acc) : zeros(negatives.size(0)));
  } else {
    p.row_neg = negatives.contiguous();
    if (has_lq) p.row_off = log_q->to(acc).contiguous();
  }
  if (!ids.empty()) {
    p.col_ids = at::cat(ids).contiguous();
    if (shared_off) p.col_off = at::cat(offs).contiguous();
  }
  return p;
}

int64_t sampled_chunk(int64_t per_col, int64_t total) {
  const int64_t target_elems = int64_t(1) << 18;
  return std::max<int64_t>(1, std::min(total, std::max<int64_t>(16, target_elems / std::max<int64_t>(per_col, 1))));
}

// Masked logits of shared columns [c0, c0+n): (B, n); wc_out gets the gathered rows.
at::Tensor shared_logits(const SampledPlan& p, const at::Tensor& items, const at::Tensor& target,
                         int64_t c0, int64_t n, bool remove_hits, at::ScalarType acc,
                         at::Tensor* wc_out) {
  at::Tensor idc = p.col_ids.narrow(0, c0, n);
  at::Tensor wc = items.index_select(0, idc).to(acc);
  *wc_out = wc;
  at::Tensor z = at::mm(p.us, wc.t());
  if (p.col_off.defined()) z.sub_(p.col_off.narrow(0, c0, n).unsqueeze(0));
  const int64_t B = p.us.size(0);
  if (remove_hits) z.masked_fill_(idc.unsqueeze(0).eq(target.unsqueeze(1)), -std::numeric_limits<double>::infinity());
  if (c0 < p.n_inbatch) {  // the diagonal of the in-batch block is the positive itself
    at::Tensor cols = at::arange(c0, c0 + n, target.options()).unsqueeze(0);
    at::Tensor rows = at::arange(B, target.options()).unsqueeze(1);
    z.masked_fill_(cols.eq(rows), -std::numeric_limits<double>::infinity());
  }
  return z;
}

// Masked logits of per-row negatives [s0, s0+n): (B, n); wn_out gets the (B, n, d) rows.
at::Tensor rowneg_logits(const SampledPlan& p, const at::Tensor& items, const at::Tensor& target,
                         int64_t s0, int64_t n, bool remove_hits, at::ScalarType acc,
                         at::Tensor* wn_out, at::Tensor* ids_out) {
  const int64_t B = p.us.size(0), d = p.us.size(1);
  at::Tensor ids = p.row_neg.narrow(1, s0, n).contiguous();
  at::Tensor wn = items.index_select(0, ids.view({-1})).to(acc).view({B, n, d});
  at::Tensor z = at::bmm(wn, p.us.unsqueeze(2)).squeeze(2);
  if (p.row_off.defined()) z.sub_(p.row_off.narrow(1, s0, n));
  if (remove_hits) z.masked_fill_(ids.eq(target.unsqueeze(1)), -std::numeric_limits<double>::infinity());
  *wn_out = wn;
  *ids_out = ids;
  return z;
}

}  // namespace

// -> [loss_rows (B,), lse (B,)] (float32, float64 for float64 inputs)
std::vector<at::Tensor> sampled_softmax_fwd_cpu(const at::Tensor& user_in, const at::Tensor& items_in,
                                                const at::Tensor& target,
                                                const at::Tensor& negatives,
                                                const std::optional<at::Tensor>& log_q,
                                                const std::optional<at::Tensor>& target_log_q,
                                                bool in_batch, bool remove_hits,
                                                double temperature) {
  at::NoGradGuard no_grad;  // called directly or below autograd: never record a graph
  // detached views: OpenMP workers do not inherit the grad mode / dispatch exclusions
  const at::Tensor user = user_in.detach(), items = items_in.detach();
  const auto acc = acc_type_of(user.scalar_type());
  const SampledPlan p = sampled_plan(user, items, target, negatives, log_q, target_log_q,
                                     in_batch, temperature, acc);
  const int64_t B = user.size(0), d = user.size(1);
  // one parallel region per candidate kind, a running lse per thread (see the file comment)
  at::Tensor lse_t = at::full({at::get_num_threads(), B}, -std::numeric_limits<double>::infinity(),
                              user.options().dtype(acc));
  if (p.col_ids.defined()) {
    const int64_t C = p.col_ids.size(0), step = sampled_chunk(B, C);
    at::parallel_for(0, (C + step - 1) / step, 1, [&](int64_t begin, int64_t end) {
      at::Tensor lse = lse_t[at::get_thread_num()];
      for (int64_t c = begin; c < end; ++c) {
        const int64_t c0 = c * step, n = std::min(step, C - c0);
        at::Tensor wc;
        at::Tensor z = shared_logits(p, items, target, c0, n, remove_hits, acc, &wc);
        lse.copy_(at::logaddexp(lse, at::logsumexp(z, {1})));
      }
    });
  }
  if (p.row_neg.defined()) {
    const int64_t S = p.row_neg.size(1), step = sampled_chunk(B * d, S);
    at::parallel_for(0, (S + step - 1) / step, 1, [&](int64_t begin, int64_t end) {
      at::Tensor lse = lse_t[at::get_thread_num()];
      for (int64_t c = begin; c < end; ++c) {
        const int64_t s0 = c * step, n = std::min(step, S - s0);
        at::Tensor wn, ids;
        at::Tensor z = rowneg_logits(p, items, target, s0, n, remove_hits, acc, &wn, &ids);
        lse.copy_(at::logaddexp(lse, at::logsumexp(z, {1})));
      }
    });
  }
  at::Tensor lse = at::logaddexp(p.zpos, at::logsumexp(lse_t, {0}));
  return {lse - p.zpos, lse};
}

// -> [d_user (B, d) | (0, d), d_items (N, d) | (0, d)] in the input dtypes
std::vector<at::Tensor> sampled_softmax_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& user_in, const at::Tensor& items_in,
    const at::Tensor& target, const at::Tensor& negatives, const std::optional<at::Tensor>& log_q,
    const std::optional<at::Tensor>& target_log_q, const at::Tensor& lse, bool in_batch,
    bool remove_hits, double temperature, bool need_user, bool need_items) {
  at::NoGradGuard no_grad;  // called directly or below autograd: never record a graph
  // detached views: OpenMP workers do not inherit the grad mode / dispatch exclusions
  const at::Tensor user = user_in.detach(), items = items_in.detach();
  const auto acc = acc_type_of(user.scalar_type());
  const SampledPlan p = sampled_plan(user, items, target, negatives, log_q, target_log_q,
                                     in_batch, temperature, acc);
  const int64_t B = user.size(0), d = user.size(1), N = items.size(0);
  SEQREC_FAST_CHECK_SHAPE(grad_rows, B);
  SEQREC_FAST_CHECK_SHAPE(lse, B);
  const at::Tensor g = grad_rows.to(acc);
  const at::Tensor g_col = g.unsqueeze(1);
  const at::Tensor lse_col = lse.to(acc).unsqueeze(1);
  at::Tensor du_t;
  if (need_user) du_t = at::zeros({at::get_num_threads(), B, d}, user.options().dtype(acc));
  at::Tensor dw = need_items ? at::zeros({N, d}, user.options().dtype(acc)) : at::Tensor();
  std::mutex scatter;  // per-row negatives: item rows repeat across chunks, scatters take turns
  if (p.col_ids.defined()) {
    const int64_t C = p.col_ids.size(0), step = sampled_chunk(B, C);
    // the shared columns' item gradients (C, d) are complete per chunk: each chunk writes its
    // own rows, and ONE index_add afterwards sums repeated ids in column order (deterministic)
    at::Tensor gcol = need_items ? at::empty({C, d}, user.options().dtype(acc)) : at::Tensor();
    at::parallel_for(0, (C + step - 1) / step, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t c0 = c * step, n = std::min(step, C - c0);
        at::Tensor wc;
        at::Tensor dz = shared_logits(p, items, target, c0, n, remove_hits, acc, &wc);
        dz.sub_(lse_col).exp_().mul_(g_col);
        if (need_user) du_t[at::get_thread_num()].addmm_(dz, wc);
        if (need_items) {
          at::Tensor out = gcol.narrow(0, c0, n);
          at::mm_out(out, dz.t(), p.us);
        }
      }
    });
    if (need_items) dw.index_add_(0, p.col_ids, gcol);
  }
  if (p.row_neg.defined()) {
    const int64_t S = p.row_neg.size(1), step = sampled_chunk(B * d, S);
    at::parallel_for(0, (S + step - 1) / step, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t s0 = c * step, n = std::min(step, S - s0);
        at::Tensor wn, ids;
        at::Tensor dz = rowneg_logits(p, items, target, s0, n, remove_hits, acc, &wn, &ids);
        dz.sub_(lse_col).exp_().mul_(g_col);
        if (need_user) du_t[at::get_thread_num()].add_(at::bmm(dz.unsqueeze(1), wn).squeeze(1));
        if (need_items) {
          at::Tensor gs = (dz.unsqueeze(2) * p.us.unsqueeze(1)).view({-1, d});  // (B·n, d)
          std::lock_guard<std::mutex> lock(scatter);
          dw.index_add_(0, ids.view({-1}), gs);
        }
      }
    });
  }
  // the positive: dL/dz = g·(p_pos - 1)
  at::Tensor dzp = (p.zpos - lse.to(acc)).exp_().sub_(1.0).mul_(g);
  if (need_items) dw.index_add_(0, target, p.us * dzp.unsqueeze(1));
  at::Tensor d_user = need_user
      ? du_t.sum(0).add_(p.wpos * dzp.unsqueeze(1)).mul_(1.0 / temperature).to(user.scalar_type())
      : at::empty({0, d}, user.options());
  at::Tensor d_items = need_items ? dw.to(items.scalar_type()) : at::empty({0, d}, items.options());
  return {d_user, d_items};
}

}  // namespace seqrec_fast

static seqrec_fast::RegisterBindings softmax_bindings([](pybind11::module_& m) {
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
  m.def("sampled_softmax_fwd_cpu", &seqrec_fast::sampled_softmax_fwd_cpu,
        "Sampled softmax forward on CPU, chunked over candidates -> [loss_rows, lse]. "
        "negatives (S,) shared or (B, S) per row; log_q like negatives or None; "
        "target_log_q (B,) or None.",
        py::arg("user"), py::arg("items"), py::arg("target"), py::arg("negatives"),
        py::arg("log_q"), py::arg("target_log_q"), py::arg("in_batch"), py::arg("remove_hits"),
        py::arg("temperature"));
  m.def("sampled_softmax_bwd_cpu", &seqrec_fast::sampled_softmax_bwd_cpu,
        "Sampled softmax backward on CPU -> [d_user | (0, d), d_items | (0, d)].",
        py::arg("grad_rows"), py::arg("user"), py::arg("items"), py::arg("target"),
        py::arg("negatives"), py::arg("log_q"), py::arg("target_log_q"), py::arg("lse"),
        py::arg("in_batch"), py::arg("remove_hits"), py::arg("temperature"),
        py::arg("need_user"), py::arg("need_items"));
});
