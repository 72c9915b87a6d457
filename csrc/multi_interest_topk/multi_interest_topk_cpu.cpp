// CPU kernel of multi-interest top-n retrieval (seqrec_fast.ops.multi_interest_topk, backend
// "cpp").
//
//   score(u, i) = max over the unmasked k of <interests[u, k], items[i]>      (fp32)
//   result: per user the n best items by (score desc, id asc); id -1 / score -inf pad.
//
// Users are cut into blocks of kUsersPerBlock; at::parallel_for hands blocks to threads. A
// block walks the catalog in tiles of kItemsPerTile items: one single-threaded ATen GEMM gives
// the (block·K, tile) scores (a few hundred KiB, cache resident). Per user and chunk of kChunk
// items, a vectorised pass takes the max over the user's unmasked interests and tests it
// against the user's running threshold; only chunks with a candidate get a scalar pass, which
// sets the user's excluded ids to -inf and puts every item scoring strictly above the
// threshold into the user's candidate buffer. A full buffer (2·n + 64 entries) is cut back to its n best (nth_element by
// (score desc, id asc)) and the threshold becomes the n-th best score. Items arrive in
// increasing id order, so an item tying with the threshold has a larger id than the n items
// already at or above it and can never enter: the strict comparison keeps the smaller-id tie
// rule exact. NaN and -inf scores never pass the comparison, hence are never returned.
// Nothing of size (U, N) or (U·K, N) is ever allocated.
// bf16/fp16 inputs are converted to fp32 once (interests and items); scores accumulate in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/registry.h"

namespace seqrec_fast {
namespace multi_interest_topk {

namespace {

constexpr int64_t kUsersPerBlock = 32;
constexpr int64_t kItemsPerTile = 512;
constexpr int64_t kChunk = 64;  // items scanned together: max over interests, then one test

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SEQREC_FAST_TOPK_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define SEQREC_FAST_TOPK_CLONES
#endif

// m[j] = max over the nk rows of rows[i][c0 + j] (j < len), NaN propagating as torch.amax does.
// Returns whether any m[j] > thr or is NaN, i.e. whether the chunk needs a closer look.
// The plain loops vectorise; a NaN (rare) sends the chunk through a scalar NaN-aware pass.
SEQREC_FAST_TOPK_CLONES bool chunk_max(const float* const* rows, int64_t nk, int64_t c0,
                                       int64_t len, float thr, float* m) {
  if (nk == 0) return false;
  const float* r0 = rows[0] + c0;
  int nan = 0;
  for (int64_t j = 0; j < len; ++j) {
    m[j] = r0[j];
    nan |= r0[j] != r0[j];
  }
  for (int64_t i = 1; i < nk; ++i) {
    const float* ri = rows[i] + c0;
    for (int64_t j = 0; j < len; ++j) {
      m[j] = ri[j] > m[j] ? ri[j] : m[j];
      nan |= ri[j] != ri[j];
    }
  }
  if (nan) {
    for (int64_t j = 0; j < len; ++j)
      for (int64_t i = 0; i < nk; ++i)
        if (rows[i][c0 + j] != rows[i][c0 + j]) m[j] = rows[i][c0 + j];
    return true;
  }
  int any = 0;
  for (int64_t j = 0; j < len; ++j) any |= m[j] > thr;
  return any != 0;
}

struct Cand {
  float score;
  int64_t id;
};

// true when a ranks before b: higher score first, then smaller id
inline bool better(const Cand& a, const Cand& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// The running top-n of one user.
struct Running {
  std::vector<Cand> buf;
  int64_t size = 0;
  float thr = -std::numeric_limits<float>::infinity();

  void reset(int64_t cap) {
    buf.resize(cap);
    size = 0;
    thr = -std::numeric_limits<float>::infinity();
  }
  void push(float v, int64_t id, int64_t n) {
    buf[size++] = {v, id};
    if (size == static_cast<int64_t>(buf.size())) {
      std::nth_element(buf.begin(), buf.begin() + (n - 1), buf.begin() + size, better);
      size = n;
      thr = buf[n - 1].score;  // the n-th best so far: later items must beat it strictly
    }
  }
};

}  // namespace

std::vector<at::Tensor> multi_interest_topk_fwd_cpu(
    const at::Tensor& interests, const at::Tensor& items, int64_t n,
    const c10::optional<at::Tensor>& interest_mask, const c10::optional<at::Tensor>& exclude) {
  TORCH_CHECK(interests.device().is_cpu() && items.device().is_cpu(),
              "multi_interest_topk_cpu: interests and items must be CPU tensors");
  TORCH_CHECK(interests.dim() == 3, "multi_interest_topk_cpu: interests must be (U, K, d), got ",
              interests.sizes());
  TORCH_CHECK(items.dim() == 2 && items.size(1) == interests.size(2),
              "multi_interest_topk_cpu: items must be (N, d), got ", items.sizes());
  TORCH_CHECK(at::isFloatingType(interests.scalar_type()) &&
                  items.scalar_type() == interests.scalar_type(),
              "multi_interest_topk_cpu: interests and items must share a floating dtype");
  TORCH_CHECK(n >= 1, "multi_interest_topk_cpu: n must be >= 1, got ", n);
  const int64_t U = interests.size(0), K = interests.size(1), d = interests.size(2);
  const int64_t N = items.size(0);
  const bool has_mask = interest_mask.has_value() && interest_mask->defined();
  const bool has_ex = exclude.has_value() && exclude->defined();
  if (has_mask) {
    SEQREC_FAST_CHECK_SHAPE(*interest_mask, U, K);
    TORCH_CHECK(interest_mask->scalar_type() == at::kBool,
                "multi_interest_topk_cpu: interest_mask must be bool");
  }
  int64_t E = 0;
  if (has_ex) {
    TORCH_CHECK(exclude->dim() == 2 && exclude->size(0) == U &&
                    exclude->scalar_type() == at::kLong,
                "multi_interest_topk_cpu: exclude must be (U, E) int64, got ", exclude->sizes());
    E = exclude->size(1);
  }

  auto scores = at::full({U, n}, -std::numeric_limits<float>::infinity(),
                         interests.options().dtype(at::kFloat));
  auto ids = at::full({U, n}, -1, interests.options().dtype(at::kLong));
  if (U == 0 || N == 0 || K == 0) return {scores, ids};

  // fp32 operands (a view when already fp32 and contiguous)
  const at::Tensor Q = interests.detach().to(at::kFloat).contiguous().view({U * K, d});
  const at::Tensor I = items.detach().to(at::kFloat).contiguous();
  at::Tensor mask_c, ex_c;
  const bool* mp = nullptr;
  const int64_t* ep = nullptr;
  if (has_mask) {
    mask_c = interest_mask->contiguous();
    mp = mask_c.data_ptr<bool>();
  }
  if (has_ex) {
    ex_c = exclude->contiguous();
    ep = ex_c.data_ptr<int64_t>();
  }
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t nblocks = (U + kUsersPerBlock - 1) / kUsersPerBlock;
  const int64_t tile = std::min(kItemsPerTile, N);
  const int64_t cap = 2 * n + 64;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, nblocks, 1, [&](int64_t b_begin, int64_t b_end) {
    at::NoGradGuard no_grad;
    at::Tensor S = at::empty({kUsersPerBlock * K * tile}, Q.options());
    std::vector<float> best(kChunk);
    std::vector<const float*> rows(K);
    std::vector<Running> run(kUsersPerBlock);
    std::vector<char> active(kUsersPerBlock);
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      const int64_t u0 = blk * kUsersPerBlock;
      const int64_t nu = std::min(kUsersPerBlock, U - u0);
      for (int64_t r = 0; r < nu; ++r) {
        run[r].reset(cap);
        bool any = true;
        if (mp) {
          any = false;
          for (int64_t k = 0; k < K; ++k) any = any || mp[(u0 + r) * K + k];
        }
        active[r] = any;
      }
      const at::Tensor Qb = Q.narrow(0, u0 * K, nu * K);
      for (int64_t j0 = 0; j0 < N; j0 += tile) {
        const int64_t nt = std::min(tile, N - j0);
        at::Tensor Sv = S.narrow(0, 0, nu * K * nt).view({nu * K, nt});
        at::mm_out(Sv, Qb, I.narrow(0, j0, nt).t());
        const float* s = Sv.data_ptr<float>();
        for (int64_t r = 0; r < nu; ++r) {
          if (!active[r]) continue;
          const int64_t u = u0 + r;
          // user's unmasked interest rows of the tile
          int64_t nk = 0;
          for (int64_t k = 0; k < K; ++k)
            if (!mp || mp[u * K + k]) rows[nk++] = s + (r * K + k) * nt;
          const int64_t* ex = ep ? ep + u * E : nullptr;
          Running& R = run[r];
          for (int64_t c0 = 0; c0 < nt; c0 += kChunk) {
            const int64_t len = std::min(kChunk, nt - c0);
            // max over the rows and "any > thr / any NaN" flags, vectorised
            if (!chunk_max(rows.data(), nk, c0, len, R.thr, best.data())) continue;
            float* m = best.data();
            if (ex) {
              for (int64_t e = 0; e < E; ++e) {
                const int64_t id = ex[e] - j0 - c0;
                if (id >= 0 && id < len) m[id] = kNegInf;
              }
            }
            // "> thr" is false for NaN and -inf: never inserted
            for (int64_t j = 0; j < len; ++j)
              if (m[j] > R.thr) R.push(m[j], j0 + c0 + j, n);
          }
        }
      }
      for (int64_t r = 0; r < nu; ++r) {
        Running& R = run[r];
        const int64_t take = std::min(n, R.size);
        std::partial_sort(R.buf.begin(), R.buf.begin() + take, R.buf.begin() + R.size, better);
        for (int64_t t = 0; t < take; ++t) {
          sp[(u0 + r) * n + t] = R.buf[t].score;
          ip[(u0 + r) * n + t] = R.buf[t].id;
        }
      }
    }
  });
  return {scores, ids};
}

namespace {
const RegisterBindings kRegister([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("multi_interest_topk_fwd_cpu", &multi_interest_topk_fwd_cpu,
        "Top-n items by max over each user's interests (CPU): -> [scores (U, n) fp32, "
        "ids (U, n) int64], id -1 / score -inf where fewer than n items",
        py::arg("interests"), py::arg("items"), py::arg("n"), py::arg("interest_mask"),
        py::arg("exclude"));
});
}  // namespace

}  // namespace multi_interest_topk
}  // namespace seqrec_fast
