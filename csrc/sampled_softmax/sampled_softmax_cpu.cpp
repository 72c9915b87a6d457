// CPU kernels of the sampled softmax (seqrec_fast.ops.sampled_softmax, backend "cpp"):
// sampled_softmax_fwd_cpu / _bwd_cpu in seqrec_fast._C.
//
// Candidates of row b: its positive, the shared columns (the in-batch
// targets, then shared negatives (S,)) and/or its own negatives (B, S). Logit = u·w/T - logQ;
// accidental hits (a candidate other than the positive with id == target[b]) and the in-batch
// diagonal are masked to -inf, i.e. removed from the partition sum. Chunked like the full
// catalog: memory O(B·chunk) for shared columns and O(B·chunk·d) for per-row negatives; one
// parallel region per candidate kind, per-thread lse / dU. Item gradients of a chunk are
// complete over the batch: the shared columns' (C, d) are scatter-added once after the parallel
// region; per-row negatives' are computed in waves of one chunk per thread and scatter-added
// in chunk order after each wave. Both in a fixed order: the item gradient has the same bits
// on every run. They go into a compact table of the distinct candidate ids (U, d), copied
// into the dense (N, d) gradient once.
// Element-wise work uses ATen ops on the chunk; everything is computed in float32 (float64 for
// float64 inputs, so gradcheck works), bf16/fp16 inputs converted chunk by chunk.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/checks.h"
#include "common/registry.h"

namespace seqrec_fast {
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
  check_cpu(user, "user");
  check_cpu(items, "items");
  check_cpu(target, "target");
  check_cpu(negatives, "negatives");
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
at::Tensor row_negatives_logits(const SampledPlan& p, const at::Tensor& items, const at::Tensor& target,
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
  const auto acc = acc_dtype(user.scalar_type());
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
        at::Tensor z = row_negatives_logits(p, items, target, s0, n, remove_hits, acc, &wn, &ids);
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
  const auto acc = acc_dtype(user.scalar_type());
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
  // Item gradients accumulate per distinct candidate id (shared columns, per-row negatives,
  // targets) in a compact (U, d) table, cast once and copied into the dense (N, d) gradient:
  // never an (N, d) accumulation buffer. `slot` maps each candidate to its table row.
  at::Tensor dw, uniq, slot;
  int64_t k_row = 0, k_pos = 0;  // where the per-row negatives / targets start in `slot`
  if (need_items) {
    std::vector<at::Tensor> cand;
    if (p.col_ids.defined()) cand.push_back(p.col_ids);
    k_row = p.col_ids.defined() ? p.col_ids.size(0) : 0;
    if (p.row_neg.defined()) cand.push_back(p.row_neg.view({-1}));
    k_pos = k_row + (p.row_neg.defined() ? p.row_neg.numel() : 0);
    cand.push_back(target);
    auto u = at::_unique2(at::cat(cand), /*sorted=*/true, /*return_inverse=*/true,
                          /*return_counts=*/false);
    uniq = std::get<0>(u);
    slot = std::get<1>(u);
    dw = at::zeros({uniq.size(0), d}, user.options().dtype(acc));
  }
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
    if (need_items) dw.index_add_(0, slot.narrow(0, 0, C), gcol);
  }
  if (p.row_neg.defined()) {
    const int64_t S = p.row_neg.size(1), step = sampled_chunk(B * d, S);
    const int64_t n_chunks = (S + step - 1) / step;
    // Item rows repeat across chunks. Chunks run in parallel in waves of one chunk per thread,
    // each writing its (B·n, d) item gradient into its own slot; after a wave the slots are
    // scatter-added in chunk order. Fixed summation order: the same bits on every run, for
    // any thread count; memory O(threads · B·chunk·d).
    const int64_t wave = need_items ? std::max<int64_t>(1, at::get_num_threads()) : n_chunks;
    std::vector<at::Tensor> slot_grad(need_items ? wave : 0), slot_ids(need_items ? wave : 0);
    const at::Tensor row_slot = need_items ? slot.narrow(0, k_row, B * S).view({B, S})
                                           : at::Tensor();
    for (int64_t w0 = 0; w0 < n_chunks; w0 += wave) {
      const int64_t w1 = std::min(n_chunks, w0 + wave);
      at::parallel_for(w0, w1, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t s0 = c * step, n = std::min(step, S - s0);
          at::Tensor wn, ids;
          at::Tensor dz =
              row_negatives_logits(p, items, target, s0, n, remove_hits, acc, &wn, &ids);
          dz.sub_(lse_col).exp_().mul_(g_col);
          if (need_user) du_t[at::get_thread_num()].add_(at::bmm(dz.unsqueeze(1), wn).squeeze(1));
          if (need_items) {
            slot_grad[c - w0] = (dz.unsqueeze(2) * p.us.unsqueeze(1)).view({-1, d});  // (B·n, d)
            slot_ids[c - w0] = row_slot.narrow(1, s0, n).reshape({-1});  // rows of ids
          }
        }
      });
      if (need_items) {
        for (int64_t c = w0; c < w1; ++c) {
          dw.index_add_(0, slot_ids[c - w0], slot_grad[c - w0]);
          slot_grad[c - w0] = at::Tensor();
        }
      }
    }
  }
  // the positive: dL/dz = g·(p_pos - 1)
  at::Tensor dzp = (p.zpos - lse.to(acc)).exp_().sub_(1.0).mul_(g);
  if (need_items) dw.index_add_(0, slot.narrow(0, k_pos, B), p.us * dzp.unsqueeze(1));
  at::Tensor d_user = need_user
      ? du_t.sum(0).add_(p.wpos * dzp.unsqueeze(1)).mul_(1.0 / temperature).to(user.scalar_type())
      : at::empty({0, d}, user.options());
  at::Tensor d_items = need_items
      ? at::zeros({N, d}, items.options()).index_copy_(0, uniq, dw.to(items.scalar_type()))
      : at::empty({0, d}, items.options());
  return {d_user, d_items};
}

}  // namespace seqrec_fast

static seqrec_fast::RegisterBindings sampled_softmax_bindings([](pybind11::module_& m) {
  namespace py = pybind11;
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
