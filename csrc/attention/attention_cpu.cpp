// CPU forward + backward of ComiRec-SA multi-interest self-attention
// (seqrec_fast.ops.multi_interest_attention, backend "cpp").
//
//   keys = x + pos                      x: (B, L, d), pos: (L, d) or none
//   H    = tanh(keys·w1 + b1)           w1: (d, d_a), b1: (d_a,) or none      (B, L, d_a)
//   A    = H·w2 + b2                    w2: (d_a, K), b2: (K,) or none        (B, L, K)
//   S    = softmax of A over the real positions of each row (0 at padding)   (B, L, K)
//   out  = Sᵀ·x                                                             (B, K, d)
//
// The batch is cut into chunks of rows small enough for H (chunk, L, d_a) to stay in cache, and
// the chunks into up to 8 tasks per thread; at::parallel_for starts one worker per thread and the
// workers take tasks from an atomic counter (a preempted thread does not hold up the others).
// Each chunk runs ATen GEMMs (single-threaded inside the parallel region) and small fused loops.
// H is never kept: the backward recomputes it from the inputs; the attention probabilities
// P (B, K, L) in the accumulation dtype are the forward's second output and saved state.
// bf16/fp16 inputs are computed in fp32 (at::opmath_type), fp32 in fp32, fp64 in fp64.
// Weight gradients are reduced from per-task partials in task order: deterministic for a given
// thread count, whichever thread ran which task.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/registry.h"

namespace seqrec_fast {
namespace attention {

namespace {

constexpr int64_t kChunkPositions = 512;  // rows per chunk ≈ this many positions (B·L rows)

// Splits the batch into tasks of whole chunks and runs body(buffers-owner lambda) on workers.
struct Tasks {
  int64_t chunk;   // rows per chunk
  int64_t ntasks;  // tasks, each a contiguous range of whole chunks
  int64_t nworkers;
  int64_t nchunks;
  int64_t B;
  Tasks(int64_t B_, int64_t L) : B(B_) {
    chunk = std::max<int64_t>(1, kChunkPositions / std::max<int64_t>(L, 1));
    nchunks = (B + chunk - 1) / chunk;
    const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
    ntasks = std::max<int64_t>(1, std::min<int64_t>(nchunks, 8 * nthreads));
    nworkers = std::min<int64_t>(nthreads, ntasks);
  }
  int64_t begin(int64_t t) const { return std::min(B, chunk * (nchunks * t / ntasks)); }
  int64_t end(int64_t t) const { return std::min(B, chunk * (nchunks * (t + 1) / ntasks)); }
  int64_t max_rows() const { return std::min(chunk, B); }
  // worker(next_task) is run once per worker thread; next_task() returns -1 when done.
  template <typename Worker>
  void run(Worker&& worker) const {
    std::atomic<int64_t> next{0};
    const int64_t n = ntasks;
    at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
      at::NoGradGuard no_grad;  // worker threads have their own grad mode
      worker([&]() -> int64_t {
        const int64_t t = next.fetch_add(1);
        return t < n ? t : -1;
      });
    });
  }
};

struct Shapes {
  int64_t B, L, d, da, K;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& w1,
                    const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                    const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& pos) {
  TORCH_CHECK(x.device().is_cpu(), "attention_cpu: seq_emb must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3, "attention_cpu: seq_emb must be (B, L, d), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "attention_cpu: seq_emb must be floating");
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2);
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == d, "attention_cpu: w1 must be (d, d_a), got ",
              w1.sizes());
  const int64_t da = w1.size(1);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == da, "attention_cpu: w2 must be (d_a, K), got ",
              w2.sizes());
  const int64_t K = w2.size(1);
  SEQREC_FAST_CHECK_SHAPE(mask, B, L);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "attention_cpu: mask must be bool");
  TORCH_CHECK(mask.device().is_cpu(), "attention_cpu: mask must be a CPU tensor");
  for (const at::Tensor* t : {&w1, &w2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device().is_cpu(),
                "attention_cpu: weights must be CPU tensors of seq_emb's dtype");
  }
  if (b1.has_value() && b1->defined()) {
    SEQREC_FAST_CHECK_SHAPE(*b1, da);
    TORCH_CHECK(b1->scalar_type() == x.scalar_type(), "attention_cpu: b1 dtype");
  }
  if (b2.has_value() && b2->defined()) {
    SEQREC_FAST_CHECK_SHAPE(*b2, K);
    TORCH_CHECK(b2->scalar_type() == x.scalar_type(), "attention_cpu: b2 dtype");
  }
  if (pos.has_value() && pos->defined()) {
    SEQREC_FAST_CHECK_SHAPE(*pos, L, d);
    TORCH_CHECK(pos->scalar_type() == x.scalar_type(), "attention_cpu: pos_emb dtype");
  }
  return {B, L, d, da, K};
}

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Parameters converted once to the accumulation dtype, contiguous.
struct Params {
  at::Tensor w1;   // (d, da)
  at::Tensor w1t;  // (da, d)  for gkeys = gZ·w1ᵀ
  at::Tensor b1;   // (da,) zeros when absent
  at::Tensor w2;   // (da, K)
  at::Tensor w2t;  // (K, da)
  at::Tensor b2;   // (K,) zeros when absent
  at::Tensor pos;  // (L, d) or undefined
};

Params make_params(at::ScalarType acc, const Shapes& s, const at::Tensor& w1,
                   const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                   const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& pos) {
  // detached: the kernels run ATen ops on worker threads, whose grad mode is their own
  auto opt = w1.options().dtype(acc);
  Params p;
  p.w1 = w1.detach().to(acc).contiguous();
  p.w1t = p.w1.t().contiguous();
  p.b1 = present(b1) ? b1->detach().to(acc).contiguous() : at::zeros({s.da}, opt);
  p.w2 = w2.detach().to(acc).contiguous();
  p.w2t = p.w2.t().contiguous();
  p.b2 = present(b2) ? b2->detach().to(acc).contiguous() : at::zeros({s.K}, opt);
  if (present(pos)) p.pos = pos->detach().to(acc).contiguous();
  return p;
}


// ---- small dense loops (K-wide contractions), compiled for AVX-512 / AVX2+FMA / baseline and
// chosen at load time (GCC target_clones): the extension itself is built for the baseline ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SEQREC_FAST_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define SEQREC_FAST_CLONES
#endif

// A[m, k] = b2[k] + Σ_a h[m, a]·w2t[k, a]          h (M, da), w2t (K, da), A (M, K)
template <typename T>
inline __attribute__((always_inline)) void small_logits_impl(const T* h, const T* w2t,
                                                             const T* b2, T* A, int64_t M,
                                                             int64_t da, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const T* hm = h + m * da;
    for (int64_t k = 0; k < K; ++k) {
      const T* wk = w2t + k * da;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t a = 0; a < da; ++a) acc += hm[a] * wk[a];
      A[m * K + k] = acc + b2[k];
    }
  }
}

// gw2t[k, a] += Σ_m ga[m, k]·h[m, a]               gw2t (K, da) stays in L1
template <typename T>
inline __attribute__((always_inline)) void small_gw2_impl(const T* h, const T* ga, T* gw2t,
                                                          int64_t M, int64_t da, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const T* hm = h + m * da;
    for (int64_t k = 0; k < K; ++k) {
      const T g = ga[m * K + k];
      if (g == T(0)) continue;
      T* gk = gw2t + k * da;
#pragma omp simd
      for (int64_t a = 0; a < da; ++a) gk[a] += g * hm[a];
    }
  }
}

// gz[m, a] = (Σ_k ga[m, k]·w2t[k, a])·(1 - h[m, a]²); gb1[a] += gz[m, a]
template <typename T>
inline __attribute__((always_inline)) void small_gz_impl(const T* ga, const T* w2t, const T* h,
                                                         T* gz, T* gb1, int64_t M, int64_t da,
                                                         int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    T* gzm = gz + m * da;
    const T* hm = h + m * da;
#pragma omp simd
    for (int64_t a = 0; a < da; ++a) gzm[a] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T g = ga[m * K + k];
      if (g == T(0)) continue;
      const T* wk = w2t + k * da;
#pragma omp simd
      for (int64_t a = 0; a < da; ++a) gzm[a] += g * wk[a];
    }
#pragma omp simd
    for (int64_t a = 0; a < da; ++a) {
      gzm[a] *= T(1) - hm[a] * hm[a];
      gb1[a] += gzm[a];
    }
  }
}

// One batch row of the backward's small part: S = probs (K, L) of the row (0 at padding),
// gS = x·goutᵀ (+ gprobs), delta = Σ_l S·gS, gA = S·(gS - delta) into ga (L, K),
// gx (L, d) = S·gout; gb2 += Σ_l gA.  x (L, d), gout (K, d).
template <typename T>
inline __attribute__((always_inline)) void row_backward_impl(
    const T* x, const T* gout, const T* probs, const T* gprobs, T* ga, T* gx, T* gb2, T* delta,
    int64_t L, int64_t d, int64_t K) {
  for (int64_t k = 0; k < K; ++k) delta[k] = 0;
  for (int64_t l = 0; l < L; ++l) {
    const T* xl = x + l * d;
    T* gxl = gx + l * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) gxl[j] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T sv = probs[k * L + l];
      T g = 0;
      if (sv != T(0)) {
        const T* gk = gout + k * d;
#pragma omp simd reduction(+ : g)
        for (int64_t j = 0; j < d; ++j) g += xl[j] * gk[j];
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) gxl[j] += sv * gk[j];
        if (gprobs) g += gprobs[k * L + l];
      }
      ga[l * K + k] = g;
      delta[k] += sv * g;
    }
  }
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k < K; ++k) {
      T& g = ga[l * K + k];
      g = probs[k * L + l] * (g - delta[k]);
      gb2[k] += g;
    }
}

#define SEQREC_FAST_DEFINE_KERNELS(T)                                                           \
  SEQREC_FAST_CLONES void small_logits(const T* h, const T* w2t, const T* b2, T* A, int64_t M, \
                                       int64_t da, int64_t K) {                                 \
    small_logits_impl<T>(h, w2t, b2, A, M, da, K);                                              \
  }                                                                                             \
  SEQREC_FAST_CLONES void small_gw2(const T* h, const T* ga, T* gw2t, int64_t M, int64_t da,   \
                                    int64_t K) {                                                \
    small_gw2_impl<T>(h, ga, gw2t, M, da, K);                                                   \
  }                                                                                             \
  SEQREC_FAST_CLONES void small_gz(const T* ga, const T* w2t, const T* h, T* gz, T* gb1,       \
                                   int64_t M, int64_t da, int64_t K) {                          \
    small_gz_impl<T>(ga, w2t, h, gz, gb1, M, da, K);                                            \
  }                                                                                             \
  SEQREC_FAST_CLONES void row_backward(const T* x, const T* gout, const T* probs,              \
                                       const T* gprobs, T* ga, T* gx, T* gb2, T* delta,         \
                                       int64_t L, int64_t d, int64_t K) {                       \
    row_backward_impl<T>(x, gout, probs, gprobs, ga, gx, gb2, delta, L, d, K);                  \
  }

SEQREC_FAST_DEFINE_KERNELS(float)
SEQREC_FAST_DEFINE_KERNELS(double)
#undef SEQREC_FAST_DEFINE_KERNELS

// Per-chunk work buffers (acc dtype), allocated once per block of rows.
struct Buffers {
  at::Tensor xa, keys, h, gh, a, gs, stats, go, gx, gk;
  Buffers(const Shapes& s, int64_t rows, at::TensorOptions opt, bool backward) {
    const int64_t M = rows * s.L;
    xa = at::empty({M, s.d}, opt);  // x in acc dtype, padding zeroed (bf16/fp16, or padding)
    keys = at::empty({M, s.d}, opt);
    h = at::empty({M, s.da}, opt);
    a = at::empty({M, s.K}, opt);
    stats = at::empty({2, rows, s.K}, opt);  // per (row, interest): max and sum, or delta
    go = at::empty({rows, s.K, s.d}, opt);  // forward: the interests of the chunk
    if (backward) {
      gh = at::empty({M, s.da}, opt);
      gs = at::empty({M, s.K}, opt);
      gx = at::empty({M, s.d}, opt);
      gk = at::empty({M, s.d}, opt);
    }
  }
};

// x rows [b0, b0+n) → acc dtype in buf.xa, 0 at padded positions (padding is not data: a NaN
// or Inf there never reaches a value or a gradient); keys = x + pos in buf.keys. Returns (x, keys)
// views of shape (n·L, d).
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> load_keys(const at::Tensor& x, const bool* mask, const Params& p,
                                            const Shapes& s, int64_t b0, int64_t n, Buffers& buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = n * s.L;
  const bool* mr = mask + b0 * s.L;
  at::Tensor xa;
  if (std::is_same_v<scalar_t, acc_t> && std::all_of(mr, mr + M, [](bool v) { return v; })) {
    xa = x.view({s.B * s.L, s.d}).narrow(0, b0 * s.L, M);  // no padding, no conversion: a view
  } else {
    xa = buf.xa.narrow(0, 0, M);
    acc_t* dst = xa.data_ptr<acc_t>();
    const scalar_t* src = x.data_ptr<scalar_t>() + b0 * s.L * s.d;
    for (int64_t m = 0; m < M; ++m) {
      acc_t* dr = dst + m * s.d;
      const scalar_t* sr = src + m * s.d;
      if (mr[m]) {
        for (int64_t j = 0; j < s.d; ++j) dr[j] = static_cast<acc_t>(sr[j]);
      } else {
        std::fill(dr, dr + s.d, acc_t(0));
      }
    }
  }
  if (!p.pos.defined()) return {xa, xa};
  const acc_t* xp = xa.data_ptr<acc_t>();
  at::Tensor keys = buf.keys.narrow(0, 0, M);
  acc_t* kp = keys.data_ptr<acc_t>();
  const acc_t* pp = p.pos.data_ptr<acc_t>();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t l = 0; l < s.L; ++l) {
      const acc_t* xr = xp + (r * s.L + l) * s.d;
      acc_t* kr = kp + (r * s.L + l) * s.d;
      const acc_t* pr = pp + l * s.d;
      for (int64_t j = 0; j < s.d; ++j) kr[j] = xr[j] + pr[j];
    }
  return {xa, keys};
}

// H = tanh(keys·w1 + b1) into buf.h (M, d_a).
at::Tensor hidden(const at::Tensor& keys, const Params& p, int64_t M, Buffers& buf) {
  at::Tensor h = buf.h.narrow(0, 0, M);
  // h = b1 row by row (memcpy; much faster than addmm's broadcast copy), then h += keys·w1
  const int64_t row_bytes = p.b1.numel() * p.b1.element_size();
  char* hp = static_cast<char*>(h.data_ptr());
  const char* bp = static_cast<const char*>(p.b1.data_ptr());
  for (int64_t m = 0; m < M; ++m) std::memcpy(hp + m * row_bytes, bp, row_bytes);
  at::addmm_out(h, h, keys, p.w1);
  h.tanh_();
  return h;
}

// H (see hidden) and the logits A = H·w2 + b2 into buf.a (M, K).
std::pair<at::Tensor, at::Tensor> scores(const at::Tensor& keys, const Params& p, int64_t M,
                                         Buffers& buf) {
  at::Tensor h = hidden(keys, p, M, buf);
  at::Tensor a = buf.a.narrow(0, 0, M);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "attention_logits", [&] {
    small_logits(h.data_ptr<scalar_t>(), p.w2t.data_ptr<scalar_t>(), p.b2.data_ptr<scalar_t>(),
                 a.data_ptr<scalar_t>(), M, p.w2t.size(1), p.w2t.size(0));
  });
  return {h, a};
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& mask, const Params& p, const Shapes& s,
                  at::Tensor& out, at::Tensor& probs) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const int64_t L = s.L, d = s.d, K = s.K;
  const Tasks tasks(s.B, L);
  const int64_t chunk = tasks.chunk;
  const auto opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool* mp = mask.data_ptr<bool>();

  tasks.run([&](auto next_task) {
    Buffers buf(s, tasks.max_rows(), opt, false);
    for (int64_t t = next_task(); t >= 0; t = next_task()) {
      for (int64_t b0 = tasks.begin(t), end = tasks.end(t); b0 < end; b0 += chunk) {
        const int64_t n = std::min(chunk, end - b0);
        std::pair<at::Tensor, at::Tensor> xk = load_keys<scalar_t>(x, mp, p, s, b0, n, buf);
        std::pair<at::Tensor, at::Tensor> ha = scores(xk.second, p, n * L, buf);
        // masked softmax over the sequence axis (0 at padding; a fully padded row is all 0)
        acc_t* A = ha.second.data_ptr<acc_t>();  // (n, L, K)
        const bool* mr = mp + b0 * L;
        acc_t* mx = buf.stats.data_ptr<acc_t>();
        acc_t* sum = mx + n * K;
        std::fill(mx, mx + n * K, -std::numeric_limits<acc_t>::infinity());
        std::fill(sum, sum + n * K, acc_t(0));
        for (int64_t r = 0; r < n; ++r)
          for (int64_t l = 0; l < L; ++l) {
            acc_t* al = A + (r * L + l) * K;
            acc_t* mk = mx + r * K;
            if (mr[r * L + l]) {
              for (int64_t k = 0; k < K; ++k) mk[k] = std::max(mk[k], al[k]);
            } else {
              std::fill(al, al + K, -std::numeric_limits<acc_t>::infinity());
            }
          }
        for (int64_t i = 0; i < n * K; ++i)
          if (std::isinf(mx[i])) mx[i] = acc_t(0);  // fully padded: exp(-inf - 0) = 0
        for (int64_t r = 0; r < n; ++r)
          for (int64_t l = 0; l < L; ++l)
            for (int64_t k = 0; k < K; ++k) A[(r * L + l) * K + k] -= mx[r * K + k];
        ha.second.exp_();  // vectorized exp over the chunk
        for (int64_t r = 0; r < n; ++r)
          for (int64_t l = 0; l < L; ++l)
            for (int64_t k = 0; k < K; ++k) sum[r * K + k] += A[(r * L + l) * K + k];
        for (int64_t i = 0; i < n * K; ++i) sum[i] = sum[i] > 0 ? acc_t(1) / sum[i] : acc_t(0);
        // S = A·(1/sum); interests[r, k] = Σ_l S[r, l, k]·x[r, l]; probs[b, k, l] = S[r, l, k]
        const acc_t* X = xk.first.data_ptr<acc_t>();
        acc_t* O = kSame ? reinterpret_cast<acc_t*>(out.data_ptr<scalar_t>()) + b0 * K * d
                         : buf.go.data_ptr<acc_t>();
        acc_t* PR = probs.data_ptr<acc_t>() + b0 * K * L;
        for (int64_t r = 0; r < n; ++r) {
          acc_t* orow = O + r * K * d;
          std::fill(orow, orow + K * d, acc_t(0));
          for (int64_t l = 0; l < L; ++l) {
            const acc_t* xl = X + (r * L + l) * d;
            for (int64_t k = 0; k < K; ++k) {
              const acc_t w = A[(r * L + l) * K + k] * sum[r * K + k];
              PR[(r * K + k) * L + l] = w;
              if (!mr[r * L + l]) continue;  // padding (0); 0·x at real ones as PyTorch: 0·inf = NaN
              acc_t* ok = orow + k * d;
              for (int64_t j = 0; j < d; ++j) ok[j] += w * xl[j];
            }
          }
        }
        if (!kSame) out.narrow(0, b0, n).copy_(buf.go.narrow(0, 0, n));
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& gout, const at::Tensor& gprobs, const at::Tensor& x,
                   const at::Tensor& mask, const at::Tensor& probs, const Params& p,
                   const Shapes& s, at::Tensor& gx, at::Tensor& gw1, at::Tensor& gb1,
                   at::Tensor& gw2, at::Tensor& gb2, at::Tensor& gpos) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const int64_t L = s.L, d = s.d, K = s.K, da = s.da;
  const Tasks tasks(s.B, L);
  const int64_t chunk = tasks.chunk;
  const auto opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool has_pos = p.pos.defined();

  // partial weight gradients per task, reduced in task order afterwards
  const int64_t nt = tasks.ntasks;
  at::Tensor pw1 = at::zeros({nt, d, da}, opt);
  at::Tensor pb1 = at::zeros({nt, da}, opt);
  at::Tensor pw2 = at::zeros({nt, K, da}, opt);  // transposed: (K, da) rows stay in L1
  at::Tensor pb2 = at::zeros({nt, K}, opt);
  at::Tensor ppos = has_pos ? at::zeros({nt, L, d}, opt) : at::Tensor();

  tasks.run([&](auto next_task) {
    Buffers buf(s, tasks.max_rows(), opt, true);
    for (int64_t t = next_task(); t >= 0; t = next_task()) {
      at::Tensor gw1b = pw1[t], gw2b = pw2[t], gb1b = pb1[t], gb2b = pb2[t];
      at::Tensor gposb = has_pos ? ppos[t] : at::Tensor();
      for (int64_t b0 = tasks.begin(t), end = tasks.end(t); b0 < end; b0 += chunk) {
        const int64_t n = std::min(chunk, end - b0);
        const int64_t M = n * L;
        std::pair<at::Tensor, at::Tensor> xk =
            load_keys<scalar_t>(x, mask.data_ptr<bool>(), p, s, b0, n, buf);
        const at::Tensor h = hidden(xk.second, p, M, buf);
        // S (saved, 0 at padding); gS = x·goutᵀ (+ gprobsᵀ); gA = S·(gS - Σ_l S·gS);
        // gx = S·gout (+ gZ·w1ᵀ below)
        const acc_t* X = xk.first.data_ptr<acc_t>();
        const acc_t* PR = probs.data_ptr<acc_t>() + b0 * K * L;
        const acc_t* GP = gprobs.defined() ? gprobs.data_ptr<acc_t>() + b0 * K * L : nullptr;
        acc_t* GO = kSame ? reinterpret_cast<acc_t*>(gout.data_ptr<scalar_t>()) + b0 * K * d
                          : buf.go.data_ptr<acc_t>();
        if (!kSame) buf.go.narrow(0, 0, n).copy_(gout.narrow(0, b0, n));
        at::Tensor gxc = kSame ? gx.view({s.B * L, d}).narrow(0, b0 * L, M)
                               : buf.gx.narrow(0, 0, M);
        acc_t* GX = gxc.data_ptr<acc_t>();
        at::Tensor ga = buf.gs.narrow(0, 0, M);  // (M, K)
        acc_t* GA = ga.data_ptr<acc_t>();
        acc_t* delta = buf.stats.data_ptr<acc_t>();
        acc_t* gb2p = gb2b.data_ptr<acc_t>();
        for (int64_t r = 0; r < n; ++r)
          row_backward(X + r * L * d, GO + r * K * d, PR + r * K * L,
                       GP ? GP + r * K * L : nullptr, GA + r * L * K, GX + r * L * d, gb2p,
                       delta, L, d, K);
        small_gw2(h.data_ptr<acc_t>(), GA, gw2b.data_ptr<acc_t>(), M, da, K);
        // gZ = (gA·w2ᵀ) ⊙ (1 - H²); gb1 += Σ_rows gZ
        at::Tensor gz = buf.gh.narrow(0, 0, M);
        small_gz(GA, p.w2t.data_ptr<acc_t>(), h.data_ptr<acc_t>(), gz.data_ptr<acc_t>(),
                 gb1b.data_ptr<acc_t>(), M, da, K);
        gw1b.addmm_(xk.second.t(), gz);
        if (has_pos) {  // gkeys = gZ·w1ᵀ goes to gx and, summed over rows, to gpos
          at::Tensor gk = buf.gk.narrow(0, 0, M);
          at::mm_out(gk, gz, p.w1t);
          const acc_t* gkp = gk.data_ptr<acc_t>();
          acc_t* gpp = gposb.data_ptr<acc_t>();
          for (int64_t r = 0; r < n; ++r)
            for (int64_t i = 0; i < L * d; ++i) {
              const acc_t v = gkp[r * L * d + i];
              gpp[i] += v;
              GX[r * L * d + i] += v;
            }
        } else {
          gxc.addmm_(gz, p.w1t);
        }
        if (!kSame) gx.narrow(0, b0, n).copy_(gxc.view({n, L, d}));
      }
    }
  });
  gw1 = pw1.sum(0);
  gw2 = pw2.sum(0).t().contiguous();
  gb1 = pb1.sum(0);
  gb2 = pb2.sum(0);
  if (has_pos) gpos = ppos.sum(0);
}

}  // namespace

// Returns {interests (B, K, d) in seq_emb's dtype, attention probabilities (B, K, L) in the
//          accumulation dtype (float32; float64 for float64 inputs)}.
std::vector<at::Tensor> attention_fwd_cpu(const at::Tensor& seq_emb, const at::Tensor& mask,
                                          const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                                          const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                                          const c10::optional<at::Tensor>& pos_emb) {
  const Shapes s = check_inputs(seq_emb, mask, w1, b1, w2, b2, pos_emb);
  const at::ScalarType dt = seq_emb.scalar_type();
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::NoGradGuard no_grad;
  at::Tensor x = seq_emb.detach().contiguous();
  at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({s.B, s.K, s.d}, x.options());
  at::Tensor probs = at::empty({s.B, s.K, s.L}, x.options().dtype(acc));
  if (s.B == 0) return {out, probs};
  const Params p = make_params(acc, s, w1, b1, w2, b2, pos_emb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "attention_fwd_cpu", [&] {
    forward_impl<scalar_t>(x, m, p, s, out, probs);
  });
  return {out, probs};
}

// Returns {grad seq_emb, grad w1, grad b1, grad w2, grad b2, grad pos_emb}; the grads of absent
// optional inputs are undefined (None in Python). grad_probs (B, K, L) may be None.
std::vector<at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out,
                                          const c10::optional<at::Tensor>& grad_probs,
                                          const at::Tensor& seq_emb, const at::Tensor& mask,
                                          const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                                          const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                                          const c10::optional<at::Tensor>& pos_emb,
                                          const at::Tensor& probs) {
  const Shapes s = check_inputs(seq_emb, mask, w1, b1, w2, b2, pos_emb);
  const at::ScalarType dt = seq_emb.scalar_type();
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  SEQREC_FAST_CHECK_SHAPE(grad_out, s.B, s.K, s.d);
  SEQREC_FAST_CHECK_SHAPE(probs, s.B, s.K, s.L);
  TORCH_CHECK(probs.scalar_type() == acc, "attention_bwd_cpu: probs must be ", acc);
  at::NoGradGuard no_grad;
  at::Tensor x = seq_emb.detach().contiguous();
  at::Tensor go = grad_out.detach().to(dt).contiguous();
  at::Tensor gp;
  if (present(grad_probs) && grad_probs->numel() > 0) {
    SEQREC_FAST_CHECK_SHAPE(*grad_probs, s.B, s.K, s.L);
    gp = grad_probs->detach().to(acc).contiguous();
  }
  at::Tensor pr = probs.detach().contiguous();
  at::Tensor m = mask.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw1, gb1, gw2, gb2, gpos;
  const Params p = make_params(acc, s, w1, b1, w2, b2, pos_emb);
  if (s.B == 0) {
    auto opt = x.options().dtype(acc);
    gw1 = at::zeros({s.d, s.da}, opt);
    gb1 = at::zeros({s.da}, opt);
    gw2 = at::zeros({s.da, s.K}, opt);
    gb2 = at::zeros({s.K}, opt);
    if (p.pos.defined()) gpos = at::zeros({s.L, s.d}, opt);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "attention_bwd_cpu", [&] {
      backward_impl<scalar_t>(go, gp, x, m, pr, p, s, gx, gw1, gb1, gw2, gb2, gpos);
    });
  }
  gw1 = gw1.to(dt);
  gw2 = gw2.to(dt);
  gb1 = present(b1) ? gb1.to(dt) : at::Tensor();
  gb2 = present(b2) ? gb2.to(dt) : at::Tensor();
  gpos = present(pos_emb) ? gpos.to(dt) : at::Tensor();
  return {gx, gw1, gb1, gw2, gb2, gpos};
}

namespace {
const RegisterBindings kRegister([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_fwd_cpu", &attention_fwd_cpu,
        "ComiRec-SA attention forward (CPU): -> [interests, probs (B, K, L) fp32/fp64]",
        py::arg("seq_emb"), py::arg("mask"), py::arg("w1"), py::arg("b1"), py::arg("w2"),
        py::arg("b2"), py::arg("pos_emb"));
  m.def("attention_bwd_cpu", &attention_bwd_cpu,
        "ComiRec-SA attention backward (CPU): -> [g_seq_emb, g_w1, g_b1, g_w2, g_b2, g_pos_emb]",
        py::arg("grad_out"), py::arg("grad_probs"), py::arg("seq_emb"), py::arg("mask"),
        py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("pos_emb"),
        py::arg("probs"));
});
}  // namespace

}  // namespace attention
}  // namespace seqrec_fast
