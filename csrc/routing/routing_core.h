// Capsule routing (MIND / ComiRec-DR) on one batch row: forward and backward of the routing
// iterations. Framework-free, header-only: raw pointers, no torch headers, so the same code is
// unit-tested by csrc/tests/test_routing_core.cpp and bound to torch by routing_cpu.cpp.
//
// Notation (one batch row): K interests, L positions, d dims, T = iters >= 1.
//   u(k, l) = u + k*sk + l*sl   the d-vector u_hat[k, l, :] (contiguous over d);
//                               shared layout (MIND): sk = 0; per-position (ComiRec-DR): sk != 0.
//   blog (K, L) routing logits, c (K, L) couplings, s / v (K, d) capsules before / after squash.
// Padded positions (mask false) have c = 0 in every iteration for every softmax, hence no effect
// on any output or gradient: every loop below runs over the real positions only, and the
// gradient at a padded position is exactly zero. The exception is D.seq_all (torch-rechub's
// sequence softmax): there the softmax runs over all L positions and the logits of padded
// positions are updated like the others, so the loops that touch logits run over all positions
// ("logit positions" idx_b below) and only the coupling sums stay on the real ones.
//
// Element type T: float, double, or any type with static_cast to/from float (at::BFloat16,
// at::Half). Arithmetic is in acc_t<T>: double for double, float otherwise. Inputs of a type other
// than acc_t are converted once per row into scratch, so every pass over u runs on acc_t data.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace seqrec_fast {
namespace routing {

constexpr double kSquashEps = 1e-9;

template <class T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

#if defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define SRF_RESTRICT __restrict
#else
#define SRF_RESTRICT
#endif

// ---------------------------------------------------------------------------------------------
// Vector primitives over d. Branch-free, contiguous, restrict: gcc -O3 vectorises them.
// The dot product keeps Lanes<A> independent partial sums (no -ffast-math needed for the compiler
// to vectorise, and the summation order is fixed, so results are deterministic).
// ---------------------------------------------------------------------------------------------
template <class A>
struct Lanes {
  static constexpr int64_t value = 32 / sizeof(A);  // 8 floats / 4 doubles
};

template <class A>
inline A dot(const A* SRF_RESTRICT a, const A* SRF_RESTRICT b, int64_t n) {
  constexpr int64_t W = Lanes<A>::value;
  A part[W];
  for (int64_t q = 0; q < W; ++q) part[q] = A(0);
  const int64_t nb = n - n % W;
  for (int64_t j = 0; j < nb; j += W)
    for (int64_t q = 0; q < W; ++q) part[q] += a[j + q] * b[j + q];
  A tail = A(0);
  for (int64_t j = nb; j < n; ++j) tail += a[j] * b[j];
  for (int64_t h = W / 2; h > 0; h /= 2)  // pairwise, fixed order
    for (int64_t q = 0; q < h; ++q) part[q] += part[q + h];
  return part[0] + tail;
}

template <class A>
inline void scale_to(A* SRF_RESTRICT y, A a, const A* SRF_RESTRICT x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = a * x[j];
}

template <class A>
inline void fill(A* SRF_RESTRICT y, A val, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = val;
}

template <class A>
inline void copy(A* SRF_RESTRICT y, const A* SRF_RESTRICT x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = x[j];
}

template <class D, class S>
inline void convert(D* SRF_RESTRICT y, const S* SRF_RESTRICT x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<D>(x[j]);
}

// y[0:d] = (or +=) sum_{t<N} a[t] * x[t][0:d], N <= 4 fixed: one vectorised loop, y loaded and
// stored once per N terms.
template <int N, bool Assign, class A>
inline void lin_terms(A* SRF_RESTRICT y, const A* a, const A* const* x, int64_t d) {
  static_assert(N >= 1 && N <= 4, "1 to 4 terms");
  const A a0 = a[0], a1 = N > 1 ? a[1] : A(0), a2 = N > 2 ? a[2] : A(0), a3 = N > 3 ? a[3] : A(0);
  const A* SRF_RESTRICT x0 = x[0];
  const A* SRF_RESTRICT x1 = x[N > 1 ? 1 : 0];
  const A* SRF_RESTRICT x2 = x[N > 2 ? 2 : 0];
  const A* SRF_RESTRICT x3 = x[N > 3 ? 3 : 0];
  for (int64_t j = 0; j < d; ++j) {
    A t = a0 * x0[j];
    if constexpr (N > 1) t += a1 * x1[j];
    if constexpr (N > 2) t += a2 * x2[j];
    if constexpr (N > 3) t += a3 * x3[j];
    if constexpr (Assign)
      y[j] = t;
    else
      y[j] += t;
  }
}

// Accumulates y = sum of the (a, x) terms added, four terms per pass over y. finish() writes
// zeros when no term was added.
template <class A>
class LinAcc {
 public:
  LinAcc(A* y, int64_t d) : y_(y), d_(d) {}
  void add(A a, const A* x) {
    a_[n_] = a;
    x_[n_] = x;
    if (++n_ == 4) flush();
  }
  void finish() {
    if (n_ > 0) flush();
    if (first_) fill(y_, A(0), d_);
  }

 private:
  template <bool Assign>
  void run() {
    switch (n_) {
      case 1: lin_terms<1, Assign>(y_, a_, x_, d_); break;
      case 2: lin_terms<2, Assign>(y_, a_, x_, d_); break;
      case 3: lin_terms<3, Assign>(y_, a_, x_, d_); break;
      default: lin_terms<4, Assign>(y_, a_, x_, d_); break;
    }
  }
  void flush() {
    if (first_)
      run<true>();
    else
      run<false>();
    first_ = false;
    n_ = 0;
  }
  A* y_;
  int64_t d_;
  int n_ = 0;
  bool first_ = true;
  A a_[4];
  const A* x_[4];
};

// squash(s) = f(n) s, f(n) = n / ((1+n) sqrt(n+eps)), n = |s|^2.
template <class A>
inline void squash_fwd(const A* SRF_RESTRICT s, A* SRF_RESTRICT v, int64_t d) {
  const A n = dot(s, s, d);
  const A f = n / ((A(1) + n) * std::sqrt(n + A(kSquashEps)));
  scale_to(v, f, s, d);
}

// g_s = f(n) g_v + 2 f'(n) <s, g_v> s, with f' written without any division by n.
template <class A>
inline void squash_bwd(const A* SRF_RESTRICT s, const A* SRF_RESTRICT gv, A* SRF_RESTRICT gs,
                       int64_t d) {
  const A n = dot(s, s, d);
  const A sg = dot(s, gv, d);
  const A ne = n + A(kSquashEps);
  const A sq = std::sqrt(ne);
  const A op = A(1) + n;
  const A f = n / (op * sq);
  const A fp = A(1) / (op * sq) - n / (op * op * sq) - A(0.5) * n / (op * ne * sq);
  const A coef = A(2) * fp * sg;
  for (int64_t j = 0; j < d; ++j) gs[j] = f * gv[j] + coef * s[j];
}

// ---------------------------------------------------------------------------------------------
// Problem description and scratch sizes.
// ---------------------------------------------------------------------------------------------
struct Dims {
  int64_t K = 1;      // interests
  int64_t L = 1;      // sequence length
  int64_t d = 1;      // capsule dim
  int64_t iters = 3;  // routing iterations, >= 1
  bool seq_axis = false;  // softmax over the sequence axis (true) or the interest axis (false)
  bool seq_all = false;   // with seq_axis: over all L positions, padded ones included
                          // (torch-rechub), c zeroed at padded positions afterwards
  bool shared = false;    // u is the same for every k (MIND); else one u per (k, l)
  int64_t k_eff() const { return shared ? 1 : K; }
};

// Row of u in acc_t, as the passes see it.
template <class A>
struct URow {
  const A* p;
  int64_t sk, sl;
  const A* at(int64_t k, int64_t l) const { return p + k * sk + l * sl; }
};

// Number of acc_t elements of scratch the calls below need per thread (plus idx_elems int32).
template <class T>
inline size_t conv_elems(const Dims& D) {  // u converted to acc_t, only when T != acc_t
  return std::is_same<T, acc_t<T>>::value ? 0 : size_t(D.L * D.k_eff() * D.d);
}

template <class T>
inline size_t fwd_scratch_elems(const Dims& D) {
  const size_t KL = size_t(D.K * D.L), Kd = size_t(D.K * D.d);
  return conv_elems<T>(D) + KL /*blog*/ + KL /*c*/ + 2 * Kd /*s, v*/;
}

template <class T>
inline size_t bwd_scratch_elems(const Dims& D, bool detach) {
  const size_t KL = size_t(D.K * D.L), Kd = size_t(D.K * D.d), Tn = size_t(D.iters);
  if (detach) return 2 * Kd /*g_v, g_s*/ + size_t(D.d) /*output row*/;
  return conv_elems<T>(D) + KL /*blog*/ + Tn * KL /*c_i*/ + 2 * Tn * Kd /*s_i, v_i*/ +
         Tn * Kd /*g_s_i*/ + (Tn - 1) * KL /*g_b_i*/ + 2 * KL /*g_b, g_c*/ + Kd /*g_v*/ +
         size_t(D.d) /*output row*/;
}

// int32 index scratch the row functions need: the real positions, then the logit positions.
inline size_t idx_elems(const Dims& D) { return size_t(2 * D.L + 2); }

// Collects the real positions of the row; returns their count.
inline int64_t real_positions(const bool* mask, int64_t L, int32_t* idx) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l)
    if (mask[l]) idx[n++] = int32_t(l);
  return n;
}

// The positions whose logits are kept: all L with D.seq_all, else the real ones (idx itself).
// idx: idx_elems(D) int32, the real positions already in its first nreal entries.
inline const int32_t* logit_positions(const Dims& D, int32_t* idx, int64_t nreal, int64_t* nb) {
  if (!D.seq_all) {
    *nb = nreal;
    return idx;
  }
  int32_t* all = idx + D.L + 1;
  for (int64_t l = 0; l < D.L; ++l) all[l] = int32_t(l);
  *nb = D.L;
  return all;
}

// u of one row as acc_t: the input itself when T == acc_t, else converted (real positions only)
// into buf laid out (L, k_eff, d).
template <class T>
inline URow<acc_t<T>> load_u(const Dims& D, const T* u, int64_t sk, int64_t sl,
                             const int32_t* idx, int64_t nreal, acc_t<T>* buf) {
  using A = acc_t<T>;
  if constexpr (std::is_same<T, A>::value) {
    (void)D; (void)idx; (void)nreal; (void)buf;
    return URow<A>{u, D.shared ? 0 : sk, sl};
  } else {
    const int64_t ke = D.k_eff(), d = D.d;
    for (int64_t r = 0; r < nreal; ++r) {
      const int64_t l = idx[r];
      for (int64_t k = 0; k < ke; ++k) convert(buf + (l * ke + k) * d, u + k * sk + l * sl, d);
    }
    return URow<A>{buf, D.shared ? 0 : d, ke * d};
  }
}

// Softmax over k at position l of x (K, L) -> c (K, L).
template <class A>
inline void softmax_interest_col(const A* x, A* c, int64_t K, int64_t L, int64_t l) {
  A m = x[l];
  for (int64_t k = 1; k < K; ++k) m = x[k * L + l] > m ? x[k * L + l] : m;
  A z = A(0);
  for (int64_t k = 0; k < K; ++k) {
    const A e = std::exp(x[k * L + l] - m);
    c[k * L + l] = e;
    z += e;
  }
  const A inv = A(1) / z;
  for (int64_t k = 0; k < K; ++k) c[k * L + l] *= inv;
}

// Softmax over the positions idx of row k of x (K, L) -> c; other entries untouched.
template <class A>
inline void softmax_seq_row(const A* x, A* c, int64_t L, int64_t k, const int32_t* idx,
                            int64_t nreal) {
  if (nreal == 0) return;
  const A* xr = x + k * L;
  A* cr = c + k * L;
  A m = xr[idx[0]];
  for (int64_t r = 1; r < nreal; ++r) m = xr[idx[r]] > m ? xr[idx[r]] : m;
  A z = A(0);
  for (int64_t r = 0; r < nreal; ++r) {
    const A e = std::exp(xr[idx[r]] - m);
    cr[idx[r]] = e;
    z += e;
  }
  const A inv = A(1) / z;
  for (int64_t r = 0; r < nreal; ++r) cr[idx[r]] *= inv;
}

// out[k, :] = sum over real l of w[k*L + l] * u(k, l)  (K, d).
template <class A>
inline void weighted_sum(const URow<A>& u, const A* w, const int32_t* idx, int64_t nreal,
                         int64_t K, int64_t L, int64_t d, A* out) {
  for (int64_t k = 0; k < K; ++k) {
    LinAcc<A> acc(out + k * d, d);
    for (int64_t r = 0; r < nreal; ++r) acc.add(w[k * L + idx[r]], u.at(k, idx[r]));
    acc.finish();
  }
}

// out[k*L + l] (= or +=) <u(k, l), v[k]> for the real positions l.
template <bool Accumulate, class A>
inline void dots_real(const URow<A>& u, const A* v, const int32_t* idx, int64_t nreal, int64_t K,
                      int64_t L, int64_t d, A* out) {
  for (int64_t k = 0; k < K; ++k) {
    const A* vk = v + k * d;
    A* ok = out + k * L;
    for (int64_t r = 0; r < nreal; ++r) {
      const A t = dot(u.at(k, idx[r]), vk, d);
      if constexpr (Accumulate)
        ok[idx[r]] += t;
      else
        ok[idx[r]] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The forward iterations on acc_t data. Iteration i writes c_i to C + i*c_step, s_i to
// S + i*s_step, v_i to V + i*v_step (steps 0: keep only the last; steps K*L / K*d: keep all, as
// the backward needs). C must be zero at padded positions on entry (they are never written).
// blog: (K, L) scratch. init: (K, L) logits at init[k*init_sk + l], or nullptr for zeros.
// Each iteration after the first: one pass of dot products (logit update), the softmax, then one
// pass accumulating s four positions at a time (the row of u stays in cache between them).
// ---------------------------------------------------------------------------------------------
// idx_b / nb: the logit positions (logit_positions); with D.seq_all, C holds the softmax p at
// padded positions too (the couplings there are zero: only real positions enter s).
template <class A>
inline void fwd_iterate(const Dims& D, const URow<A>& u, const int32_t* idx, int64_t nreal,
                        const int32_t* idx_b, int64_t nb, const A* init, int64_t init_sk,
                        A* blog, A* C, int64_t c_step, A* S, int64_t s_step, A* V,
                        int64_t v_step) {
  const int64_t K = D.K, L = D.L, d = D.d, T = D.iters;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t l = idx_b[r];
      blog[k * L + l] = init ? init[k * init_sk + l] : A(0);
    }
  for (int64_t it = 0; it < T; ++it) {
    A* c = C + it * c_step;
    A* s = S + it * s_step;
    const A* vprev = it > 0 ? V + (it - 1) * v_step : nullptr;
    if (vprev) dots_real<true>(u, vprev, idx_b, nb, K, L, d, blog);
    if (!D.seq_axis)
      for (int64_t r = 0; r < nreal; ++r) softmax_interest_col(blog, c, K, L, idx[r]);
    else
      for (int64_t k = 0; k < K; ++k) softmax_seq_row(blog, c, L, k, idx_b, nb);
    weighted_sum(u, c, idx, nreal, K, L, d, s);
    A* v = V + it * v_step;
    for (int64_t k = 0; k < K; ++k) squash_fwd(s + k * d, v + k * d, d);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward of one row.
//   u: this row's u_hat, u(k, l) = u + k*u_sk + l*u_sl (u_sk ignored when D.shared)
//   mask: L bools (true = real item); init: (K, L) at init[k*init_sk + l] or nullptr
//   v_out (K, d) contiguous, T; c_out (K, L) contiguous, acc_t (c of the last iteration);
//   s_out (K, d) contiguous, acc_t (s of the last iteration). c_out / s_out may be nullptr.
//   ws: fwd_scratch_elems<T>(D) acc_t; idx: idx_elems(D) int32.
// ---------------------------------------------------------------------------------------------
template <class T>
inline void routing_fwd_row(const Dims& D, const T* u, int64_t u_sk, int64_t u_sl,
                            const bool* mask, const acc_t<T>* init, int64_t init_sk, T* v_out,
                            acc_t<T>* c_out, acc_t<T>* s_out, acc_t<T>* ws, int32_t* idx) {
  using A = acc_t<T>;
  const int64_t K = D.K, L = D.L, d = D.d;
  const int64_t nreal = real_positions(mask, L, idx);
  int64_t nb = 0;
  const int32_t* idx_b = logit_positions(D, idx, nreal, &nb);
  A* conv = ws;
  A* blog = conv + conv_elems<T>(D);
  A* c = blog + K * L;
  A* s = c + K * L;
  A* v = s + K * d;
  fill(c, A(0), K * L);
  const URow<A> ur = load_u<T>(D, u, u_sk, u_sl, idx_b, nb, conv);
  fwd_iterate<A>(D, ur, idx, nreal, idx_b, nb, init, init_sk, blog, c, 0, s, 0, v, 0);
  if (D.seq_all)  // c = p m: zero at padded positions
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = 0; l < L; ++l)
        if (!mask[l]) c[k * L + l] = A(0);
  convert(v_out, v, K * d);
  if (c_out) copy(c_out, c, K * L);
  if (s_out) copy(s_out, s, K * d);
}

// n terms coef[t*coef_step + k*L + l] * vec[t*vec_step + k*d + :] (t < n) of a grad_u entry.
template <class A>
struct Terms {
  const A* coef;
  int64_t coef_step;
  const A* vec;
  int64_t vec_step;
  int64_t n;
};

// Writes one row of grad_u: out(k, l) = sum of both term groups at (k, l) for real l; for
// padded l zero, or only the g2 terms when pad_g2 (D.seq_all: the logits of padded positions
// depend on u there); the shared layout sums over k into out(l). row: d acc_t of scratch, used
// only when T != acc_t (else the sums go straight to the output).
template <class T>
inline void write_grad_u(const Dims& D, const bool* mask, const Terms<acc_t<T>>& g1,
                         const Terms<acc_t<T>>& g2, T* out, int64_t o_sk, int64_t o_sl,
                         acc_t<T>* row, bool pad_g2 = false) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same<T, A>::value;
  const int64_t K = D.K, L = D.L, d = D.d;
  const int64_t kout = D.shared ? 1 : K;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t ko = 0; ko < kout; ++ko) {
      T* o = out + ko * o_sk + l * o_sl;
      if (!mask[l] && !pad_g2) {
        for (int64_t j = 0; j < d; ++j) o[j] = static_cast<T>(A(0));
        continue;
      }
      A* y;
      if constexpr (kDirect) y = o; else y = row;
      LinAcc<A> acc(y, d);
      const int64_t k0 = D.shared ? 0 : ko, k1 = D.shared ? K : ko + 1;
      for (int64_t k = k0; k < k1; ++k) {
        if (mask[l])
          for (int64_t t = 0; t < g1.n; ++t)
            acc.add(g1.coef[t * g1.coef_step + k * L + l], g1.vec + t * g1.vec_step + k * d);
        for (int64_t t = 0; t < g2.n; ++t)
          acc.add(g2.coef[t * g2.coef_step + k * L + l], g2.vec + t * g2.vec_step + k * d);
      }
      acc.finish();
      if constexpr (!kDirect) convert(o, row, d);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward of one row, iterations before the last detached (ComiRec): the last couplings are
// constants, so grad_u(k, l) = c_last[k, l] * squash_bwd(s_last[k], grad_v[k]). u is not needed.
//   grad_v (K, d) contiguous, T; c_last (K, L), s_last (K, d) contiguous, acc_t;
//   out(k, l) = out + k*o_sk + l*o_sl (o_sk ignored when D.shared: summed over k).
//   ws: bwd_scratch_elems<T>(D, true) acc_t.
// ---------------------------------------------------------------------------------------------
template <class T>
inline void routing_bwd_detached_row(const Dims& D, const T* grad_v, const bool* mask,
                                     const acc_t<T>* c_last, const acc_t<T>* s_last, T* out,
                                     int64_t o_sk, int64_t o_sl, acc_t<T>* ws) {
  using A = acc_t<T>;
  const int64_t K = D.K, d = D.d;
  A* gv = ws;
  A* gs = gv + K * d;
  convert(gv, grad_v, K * d);
  for (int64_t k = 0; k < K; ++k) squash_bwd(s_last + k * d, gv + k * d, gs + k * d, d);
  write_grad_u<T>(D, mask, Terms<A>{c_last, 0, gs, 0, 1}, Terms<A>{nullptr, 0, nullptr, 0, 0}, out,
                  o_sk, o_sl, gs + K * d);
}

// ---------------------------------------------------------------------------------------------
// Backward of one row through every iteration (no detach). Recomputes the forward keeping c_i,
// s_i, v_i, then runs the iterations in reverse. g_b holds the gradient w.r.t. the logits of the
// iteration after the current one; with c_i = p_i at real positions (and both zero at padded
// ones) the softmax backward needs only c_i. grad_u is written once at the end:
//   grad_u(k, l) = sum_i c_i[k,l] g_s_i[k] + sum_{i<T-1} g_b_{i+1}[k,l] v_i[k].
//   u as in routing_fwd_row; grad_v, out as in routing_bwd_detached_row; init as the forward's.
//   ws: bwd_scratch_elems<T>(D, false) acc_t; idx: idx_elems(D) int32.
// ---------------------------------------------------------------------------------------------
template <class T>
inline void routing_bwd_full_row(const Dims& D, const T* grad_v, const T* u, int64_t u_sk,
                                 int64_t u_sl, const bool* mask, const acc_t<T>* init,
                                 int64_t init_sk, T* out, int64_t o_sk, int64_t o_sl,
                                 acc_t<T>* ws, int32_t* idx) {
  using A = acc_t<T>;
  const int64_t K = D.K, L = D.L, d = D.d, T_ = D.iters;
  const int64_t KL = K * L, Kd = K * d;
  const int64_t nreal = real_positions(mask, L, idx);
  int64_t nb = 0;
  const int32_t* idx_b = logit_positions(D, idx, nreal, &nb);

  A* conv = ws;
  A* blog = conv + conv_elems<T>(D);
  A* C = blog + KL;          // T * KL
  A* S = C + T_ * KL;        // T * Kd
  A* V = S + T_ * Kd;        // T * Kd
  A* GS = V + T_ * Kd;       // T * Kd
  A* GB = GS + T_ * Kd;      // (T-1) * KL
  A* gb = GB + (T_ - 1) * KL;
  A* gc = gb + KL;
  A* gv = gc + KL;

  fill(C, A(0), T_ * KL);
  const URow<A> ur = load_u<T>(D, u, u_sk, u_sl, idx_b, nb, conv);
  fwd_iterate<A>(D, ur, idx, nreal, idx_b, nb, init, init_sk, blog, C, KL, S, Kd, V, Kd);

  fill(gb, A(0), KL);
  convert(gv, grad_v, Kd);
  for (int64_t i = T_ - 1; i >= 0; --i) {
    const A* c = C + i * KL;
    A* gs = GS + i * Kd;
    for (int64_t k = 0; k < K; ++k) squash_bwd(S + i * Kd + k * d, gv + k * d, gs + k * d, d);
    if (i < T_ - 1) copy(GB + i * KL, gb, KL);  // gradient w.r.t. the logits of iteration i+1
    if (i == 0) break;  // the gradient w.r.t. init_logits is not needed
    // g_c = <g_s_i, u> at real positions; softmax backward; g_b (now w.r.t. the logits of
    // iteration i) += g_p; then g_v_{i-1} = sum_l g_b u.
    dots_real<false>(ur, gs, idx, nreal, K, L, d, gc);
    if (!D.seq_axis) {
      for (int64_t r = 0; r < nreal; ++r) {
        const int64_t l = idx[r];
        A sum = A(0);
        for (int64_t k = 0; k < K; ++k) sum += c[k * L + l] * gc[k * L + l];
        for (int64_t k = 0; k < K; ++k) gb[k * L + l] += c[k * L + l] * (gc[k * L + l] - sum);
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        A sum = A(0);
        for (int64_t r = 0; r < nreal; ++r) sum += c[k * L + idx[r]] * gc[k * L + idx[r]];
        // c holds p (= the coupling at real positions); d c / d p = m, so g_p = g_c m
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t l = idx_b[r];
          const A g = mask[l] ? gc[k * L + l] : A(0);
          gb[k * L + l] += c[k * L + l] * (g - sum);
        }
      }
    }
    weighted_sum(ur, gb, idx_b, nb, K, L, d, gv);
  }

  // Terms: c_i with g_s_i (all i), g_b_{i+1} with v_i (i < T-1).
  write_grad_u<T>(D, mask, Terms<A>{C, KL, GS, Kd, T_}, Terms<A>{GB, KL, V, Kd, T_ - 1}, out,
                  o_sk, o_sl, gv + Kd, D.seq_all);
}

}  // namespace routing
}  // namespace seqrec_fast
