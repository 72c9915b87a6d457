// CPU kernel of ComiRec's controllable aggregation (seqrec_fast.ops.diverse_topk, backend
// "cpp"), parallel over users (at::parallel_for).
//
// Input, prepared by the op layer: per user M candidates sorted by score descending (stable),
// scores in float64 with -inf at invalid places (no id, no category, NaN), their categories,
// and the penalty table pen[c] = lam·c (c = 0..n, float64, computed once so that every backend
// rounds lam·c the same way and no compiler can fuse it into an FMA).
// n rounds per user: pick the first live candidate with the largest s - pen[count of picked
// items of its category], remove it, count its category. The scan stops early at a candidate
// whose raw score is below the best adjusted score so far: the list is sorted and lam >= 0,
// so no later candidate can win (ComiRec's loop does the same). Counts are kept per
// candidate (bumped for every live candidate of the picked category): O(n·M) per user.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/registry.h"

namespace seqrec_fast {
namespace diverse_topk {

std::vector<at::Tensor> diverse_topk_fwd_cpu(const at::Tensor& scores, const at::Tensor& ids,
                                             const at::Tensor& cats, int64_t n,
                                             const at::Tensor& pen) {
  TORCH_CHECK(scores.device().is_cpu(), "diverse_topk_cpu: scores must be a CPU tensor");
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kDouble,
              "diverse_topk_cpu: scores must be (U, M) float64, got ", scores.sizes());
  const int64_t U = scores.size(0), M = scores.size(1);
  SEQREC_FAST_CHECK_SHAPE(ids, U, M);
  SEQREC_FAST_CHECK_SHAPE(cats, U, M);
  TORCH_CHECK(ids.scalar_type() == at::kLong && cats.scalar_type() == at::kLong,
              "diverse_topk_cpu: ids and categories must be int64");
  TORCH_CHECK(n >= 1, "diverse_topk_cpu: n must be >= 1");
  SEQREC_FAST_CHECK_SHAPE(pen, n + 1);
  TORCH_CHECK(pen.scalar_type() == at::kDouble, "diverse_topk_cpu: pen must be float64");
  const at::Tensor s_c = scores.contiguous(), i_c = ids.contiguous(), c_c = cats.contiguous();
  const at::Tensor p_c = pen.contiguous();
  auto out_s = at::full({U, n}, -std::numeric_limits<double>::infinity(), s_c.options());
  auto out_i = at::full({U, n}, -1, i_c.options());
  const double* sp = s_c.data_ptr<double>();
  const int64_t* ip = i_c.data_ptr<int64_t>();
  const int64_t* cp = c_c.data_ptr<int64_t>();
  const double* pp = p_c.data_ptr<double>();
  double* osp = out_s.data_ptr<double>();
  int64_t* oip = out_i.data_ptr<int64_t>();
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();

  // about 2^16 candidate visits per task at least: small batches stay on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, n * M));
  at::parallel_for(0, U, grain, [&](int64_t u_begin, int64_t u_end) {
    std::vector<int64_t> live;   // positions of the live candidates, in list order
    std::vector<int32_t> cnt(M);  // picked items of each candidate's category
    for (int64_t u = u_begin; u < u_end; ++u) {
      const double* s = sp + u * M;
      const int64_t* c = cp + u * M;
      live.clear();
      for (int64_t m = 0; m < M; ++m) {
        if (s[m] > kNegInf) live.push_back(m);  // sorted: -inf (invalid) places are last
        cnt[m] = 0;
      }
      const int64_t rounds = std::min<int64_t>(n, static_cast<int64_t>(live.size()));
      for (int64_t j = 0; j < rounds; ++j) {
        int64_t best = 0;
        double best_v = s[live[0]] - pp[cnt[live[0]]];
        for (int64_t t = 1, L = static_cast<int64_t>(live.size()); t < L; ++t) {
          const int64_t m = live[t];
          const double v = s[m] - pp[cnt[m]];
          if (v > best_v) {
            best = t;
            best_v = v;
          } else if (s[m] < best_v) {
            break;
          }
        }
        const int64_t m = live[best];
        osp[u * n + j] = s[m];
        oip[u * n + j] = ip[u * M + m];
        live.erase(live.begin() + best);
        const int64_t cat = c[m];
        for (int64_t x : live)
          if (c[x] == cat) ++cnt[x];
      }
    }
  });
  return {out_s, out_i};
}

namespace {
const RegisterBindings kRegister([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("diverse_topk_fwd_cpu", &diverse_topk_fwd_cpu,
        "ComiRec's greedy controllable aggregation (CPU) over sorted float64 candidates: -> "
        "[scores (U, n) float64, ids (U, n) int64]",
        py::arg("scores"), py::arg("ids"), py::arg("categories"), py::arg("n"), py::arg("pen"));
});
}  // namespace

}  // namespace diverse_topk
}  // namespace seqrec_fast
