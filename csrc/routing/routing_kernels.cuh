// CUDA kernels of capsule routing (MIND / ComiRec-DR): forward, detached backward, full backward.
//
// Framework-free (CUDA runtime, cuda_fp16.h, cuda_bf16.h only). Included by exactly one
// routing_<dtype>_kernels.cu per element type, which instantiates plan_impl / launch_impl.
// The algorithm is routing_core.h's (the CPU kernel) row by row; only the parallel schedule
// differs.
//
// Schedule: one thread block per batch row (persistent: block i takes rows i, i + grid, ...).
//   * Warp 0 compacts the mask into the list of real positions idx[r] (r < nreal) and the inverse
//     map pos[l] (-1 when padded); every loop then runs over the real positions only, so padded
//     positions have c = 0 and zero gradient by construction (as in routing_core.h).
//   * The row's u tile is copied once into shared memory when it fits (STAGED: rows (r, k) of dp
//     elements, r the compacted position, dp = d rounded up to a 16-byte chunk, zero padded);
//     otherwise every pass reads u from global memory (L2) with 16-byte loads when aligned.
//   * Small per-row state (logits, couplings (K, L) indexed [k*L + r]; capsules (K, dp)) lives in
//     shared memory, or in a global workspace slice per block when it does not fit.
//   * Passes over u (each followed by __syncthreads):
//       dots:  out[k, r] (+)= <u(k, r), w[k]>   groups of G lanes per (k, r), shuffle reduction
//       wsum:  out[k, :]  = sum_r coef[k, r] u(k, r)  threads own a (k, 16-byte chunk) column and
//              a 1/P share of the positions; the P partial sums are added in a fixed order
//     softmax and squash run on the small state (thread per position / warp per interest).
// All arithmetic is fp32; bf16 / fp16 are converted on load and rounded once on store.
// Determinism: fixed reduction orders for a given plan (thread count), no atomics.
#pragma once

#include <cfloat>
#include <climits>
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "routing/routing_kernels.h"

namespace seqrec_fast {
namespace routing_cuda {
namespace detail {

constexpr float kSquashEps = 1e-9f;  // as routing_core.h's kSquashEps, in fp32
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 512;

// ---------------------------------------------------------------------------------------------
// Element types. S is the storage type (raw 16-bit patterns for bf16 / fp16, so no operator of
// __nv_bfloat16 / __half is needed: the code builds with torch's -D__CUDA_NO_*_CONVERSIONS__).
// kVec elements make one 16-byte chunk. Element e of a chunk is in the low half of word e/2.
// ---------------------------------------------------------------------------------------------
struct F32 {
  using S = float;
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_f(S x) { return x; }
  __device__ __forceinline__ static S from_f(float x) { return x; }
  __device__ __forceinline__ static void unpack(const uint4& w, float (&x)[kVec]) {
    x[0] = __uint_as_float(w.x);
    x[1] = __uint_as_float(w.y);
    x[2] = __uint_as_float(w.z);
    x[3] = __uint_as_float(w.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[kVec]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
};

struct BF16 {
  using S = unsigned short;
  static constexpr int kVec = 8;
  // bf16 -> fp32 is exact: the 16 bits are the high half of the float.
  __device__ __forceinline__ static float to_f(S x) { return __uint_as_float(unsigned(x) << 16); }
  __device__ __forceinline__ static S from_f(float x) {  // round to nearest even, as torch
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  __device__ __forceinline__ static void unpack2(unsigned w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static unsigned pack2(float lo, float hi) {
    return unsigned(from_f(lo)) | (unsigned(from_f(hi)) << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& w, float (&x)[kVec]) {
    unpack2(w.x, x[0], x[1]);
    unpack2(w.y, x[2], x[3]);
    unpack2(w.z, x[4], x[5]);
    unpack2(w.w, x[6], x[7]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[kVec]) {
    return make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
  }
};

struct F16 {
  using S = unsigned short;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_f(S x) { return __half2float(__ushort_as_half(x)); }
  __device__ __forceinline__ static S from_f(float x) {  // round to nearest even, as torch
    return __half_as_ushort(__float2half_rn(x));
  }
  __device__ __forceinline__ static void unpack2(unsigned w, float& lo, float& hi) {
    lo = to_f(static_cast<S>(w & 0xffffu));
    hi = to_f(static_cast<S>(w >> 16));
  }
  __device__ __forceinline__ static unsigned pack2(float lo, float hi) {
    return unsigned(from_f(lo)) | (unsigned(from_f(hi)) << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& w, float (&x)[kVec]) {
    unpack2(w.x, x[0], x[1]);
    unpack2(w.y, x[2], x[3]);
    unpack2(w.z, x[4], x[5]);
    unpack2(w.w, x[6], x[7]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[kVec]) {
    return make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
  }
};

// Where the passes read u from.
enum USource : int { kSmem = 0, kGlobalVec = 1, kGlobalScalar = 2 };

// ---------------------------------------------------------------------------------------------
// Per-launch geometry and the layout of a block's state area (in 4-byte words; every array
// starts on a 16-byte boundary). Computed on the host by make_layout, read by the kernels.
// ---------------------------------------------------------------------------------------------
struct Layout {
  int K, L, d, T;   // interests, positions, dim, iterations
  int V;            // elements per 16-byte chunk
  int dp, nch;      // d rounded up to a chunk, chunks per row (dp = nch * V)
  int ke;           // rows of u per position: 1 (shared) or K
  int G;            // lanes per dot product (power of two <= 32, >= nch when nch <= 32)
  int KL, Kdp;      // K*L, K*dp
  // word offsets in the state area (-1: absent in this pass)
  int o_blog, o_c, o_s, o_v, o_gs, o_gb, o_gbc, o_gc, o_gv, o_red, o_idx, o_pos, o_nreal;
  int state_words;  // multiple of 4
  int u_bytes;      // bytes of the staged u tile at the start of shared memory (0: not staged)
};

inline int64_t round4(int64_t x) { return (x + 3) & ~int64_t(3); }

// false when a size does not fit the int indexing the kernels use.
inline bool make_layout(Pass pass, const RoutingParams& p, int V, int elem_bytes, int threads,
                        bool staged, Layout* g) {
  const int64_t K = p.K, L = p.L, d = p.d, T = p.iters;
  const int64_t dp = (d + V - 1) / V * V, nch = dp / V, ke = p.shared ? 1 : K;
  const int64_t KL = K * L, Kdp = K * dp;
  int64_t G = 1;
  while (G < nch && G < 32) G *= 2;
  int64_t w = 0;
  auto take = [&w](int64_t n) {
    const int64_t at = w;
    w += round4(n);
    return at;
  };
  int64_t o_blog = -1, o_c = -1, o_s = -1, o_v = -1, o_gs = -1, o_gb = -1, o_gbc = -1, o_gc = -1,
          o_gv = -1, o_red = -1, o_idx = -1, o_pos = -1, o_nreal = -1;
  if (pass == Pass::kBackwardDetached) {
    o_s = take(Kdp);
    o_gv = take(Kdp);
    o_gs = take(Kdp);
  } else {
    const bool full = pass == Pass::kBackwardFull;
    const int64_t keep = full ? T : 1;  // iterations whose c / s / v are kept
    o_blog = take(KL);
    o_c = take(keep * KL);
    o_s = take(keep * Kdp);
    o_v = take(keep * Kdp);
    if (full) {
      o_gs = take(T * Kdp);
      o_gb = take((T - 1) * KL);
      o_gbc = take(KL);
      o_gc = take(KL);
      o_gv = take(Kdp);
    }
    o_red = take(int64_t(threads) * V);
    o_idx = take(L);
    o_pos = take(L);
    o_nreal = take(1);
  }
  const int64_t u_bytes =
      (staged && pass != Pass::kBackwardDetached) ? (L * ke * dp * elem_bytes + 15) / 16 * 16 : 0;
  const int64_t lim = INT_MAX / 8;
  if (K < 1 || L < 1 || d < 1 || T < 1 || KL > lim || Kdp > lim || L * ke * dp > lim ||
      w > lim || u_bytes > lim)
    return false;
  Layout out;
  out.K = int(K);
  out.L = int(L);
  out.d = int(d);
  out.T = int(T);
  out.V = V;
  out.dp = int(dp);
  out.nch = int(nch);
  out.ke = int(ke);
  out.G = int(G);
  out.KL = int(KL);
  out.Kdp = int(Kdp);
  out.o_blog = int(o_blog);
  out.o_c = int(o_c);
  out.o_s = int(o_s);
  out.o_v = int(o_v);
  out.o_gs = int(o_gs);
  out.o_gb = int(o_gb);
  out.o_gbc = int(o_gbc);
  out.o_gc = int(o_gc);
  out.o_gv = int(o_gv);
  out.o_red = int(o_red);
  out.o_idx = int(o_idx);
  out.o_pos = int(o_pos);
  out.o_nreal = int(o_nreal);
  out.state_words = int(w);
  out.u_bytes = int(u_bytes);
  *g = out;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Small device helpers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}

// N floats from / to a 16-byte aligned address (state arrays, shared or global).
template <int N>
__device__ __forceinline__ void load_f(const float* p, float (&x)[N]) {
  static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
  for (int t = 0; t < N / 4; ++t) {
    const float4 a = reinterpret_cast<const float4*>(p)[t];
    x[4 * t] = a.x;
    x[4 * t + 1] = a.y;
    x[4 * t + 2] = a.z;
    x[4 * t + 3] = a.w;
  }
}

template <int N>
__device__ __forceinline__ void store_f(float* p, const float (&x)[N]) {
  static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
  for (int t = 0; t < N / 4; ++t)
    reinterpret_cast<float4*>(p)[t] =
        make_float4(x[4 * t], x[4 * t + 1], x[4 * t + 2], x[4 * t + 3]);
}

// One chunk of the element type at p (element j0 of a row whose first `rem` = d - j0 elements
// from p exist) -> fp32. VEC: one 16-byte read-only load (p 16-byte aligned); else scalar loads,
// zero beyond the row.
template <class E, bool VEC>
__device__ __forceinline__ void load_chunk_global(const typename E::S* p, int rem,
                                                  float (&x)[E::kVec]) {
  if constexpr (VEC) {
    (void)rem;
    E::unpack(__ldg(reinterpret_cast<const uint4*>(p)), x);
  } else {
#pragma unroll
    for (int e = 0; e < E::kVec; ++e) x[e] = e < rem ? E::to_f(__ldg(p + e)) : 0.f;
  }
}

// Stores the first min(kVec, rem) values of x at p in the element type.
template <class E, bool VEC>
__device__ __forceinline__ void store_chunk_global(typename E::S* p, int rem,
                                                   const float (&x)[E::kVec]) {
  if constexpr (VEC) {
    (void)rem;
    *reinterpret_cast<uint4*>(p) = E::pack(x);
  } else {
#pragma unroll
    for (int e = 0; e < E::kVec; ++e)
      if (e < rem) p[e] = E::from_f(x[e]);
  }
}

template <class E>
__device__ __forceinline__ void store_chunk_global_rt(typename E::S* p, int rem,
                                                      const float (&x)[E::kVec], bool vec) {
  if (vec)  // uniform over the launch
    store_chunk_global<E, true>(p, rem, x);
  else
    store_chunk_global<E, false>(p, rem, x);
}

// ---------------------------------------------------------------------------------------------
// Readers of the row's u(k, r) (k < K, r < nreal), chunk q -> fp32. sk = 0 for the shared layout.
// ---------------------------------------------------------------------------------------------
template <class E, int SRC>
struct URows;

template <class E>
struct URows<E, kSmem> {  // staged tile: row (r, k) at base + r*sl + k*sk, dp elements
  const typename E::S* base;
  int sk, sl;
  __device__ __forceinline__ void load(int k, int r, int q, int /*d*/,
                                       float (&x)[E::kVec]) const {
    const typename E::S* p = base + r * sl + k * sk + q * E::kVec;
    E::unpack(*reinterpret_cast<const uint4*>(p), x);
  }
};

template <class E>
struct URows<E, kGlobalVec> {
  const typename E::S* base;  // u + b*u_sb
  int64_t sk, sl;
  const int* idx;
  __device__ __forceinline__ void load(int k, int r, int q, int d, float (&x)[E::kVec]) const {
    const typename E::S* p = base + int64_t(idx[r]) * sl + k * sk + q * E::kVec;
    load_chunk_global<E, true>(p, d - q * E::kVec, x);
  }
};

template <class E>
struct URows<E, kGlobalScalar> {
  const typename E::S* base;
  int64_t sk, sl;
  const int* idx;
  __device__ __forceinline__ void load(int k, int r, int q, int d, float (&x)[E::kVec]) const {
    const typename E::S* p = base + int64_t(idx[r]) * sl + k * sk + q * E::kVec;
    load_chunk_global<E, false>(p, d - q * E::kVec, x);
  }
};

// ---------------------------------------------------------------------------------------------
// Row set-up.
// ---------------------------------------------------------------------------------------------
// Warp 0: idx[r] = r-th real position, pos[l] = r or -1, *nreal_out. Caller syncs.
// all (seq_all, torch-rechub's sequence softmax): every position is kept (idx[r] = r, nreal = L)
// because the logits of padded ones matter; pos[l] = l at real positions, -1 at padded ones
// (then only a flag: the couplings there are zeroed).
__device__ __forceinline__ void compact_mask(const bool* mask_row, int L, int* idx, int* pos,
                                             int* nreal_out, bool all) {
  if (threadIdx.x >= 32) return;
  const unsigned char* m = reinterpret_cast<const unsigned char*>(mask_row);
  const int lane = threadIdx.x;
  int base = 0;
  for (int l0 = 0; l0 < L; l0 += 32) {  // uniform trip count over the warp
    const int l = l0 + lane;
    const bool real = l < L && m[l] != 0;
    const bool on = all ? l < L : real;
    const unsigned bal = __ballot_sync(kFullMask, on);
    const int r = base + __popc(bal & ((1u << lane) - 1u));
    if (l < L) {
      pos[l] = real ? r : -1;
      if (on) idx[r] = l;
    }
    base += __popc(bal);
  }
  if (lane == 0) *nreal_out = base;
}

// Copies u(k, idx[r]) for r < nreal into the tile (rows of dp elements, zero padded).
template <class E, bool SHARED>
__device__ __forceinline__ void stage_u(const RoutingParams& p, const Layout& g, int64_t b,
                                        const int* idx, int nreal, typename E::S* tile, bool vec) {
  using S = typename E::S;
  constexpr int V = E::kVec;
  const S* ub = static_cast<const S*>(p.u) + b * p.u_sb;
  const int64_t sk = SHARED ? 0 : p.u_sk;
  const int nch = g.nch, ke = g.ke, n = nreal * ke * nch;
  const int tid = threadIdx.x, nt = blockDim.x;
  if (vec) {
    // four independent 16-byte loads in flight per thread before the stores
    constexpr int kBatch = 4;
    for (int i0 = tid; i0 < n; i0 += kBatch * nt) {
      uint4 w[kBatch];
      int dst[kBatch];
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        const int i = i0 + t * nt;
        dst[t] = -1;
        if (i < n) {
          const int q = i % nch, rk = i / nch, k = rk % ke, r = rk / ke;
          w[t] = __ldg(reinterpret_cast<const uint4*>(ub + int64_t(idx[r]) * p.u_sl + k * sk +
                                                      q * V));
          dst[t] = (r * ke + k) * g.dp + q * V;
        }
      }
#pragma unroll
      for (int t = 0; t < kBatch; ++t)
        if (dst[t] >= 0) *reinterpret_cast<uint4*>(tile + dst[t]) = w[t];
    }
  } else {
    for (int i = tid; i < n; i += nt) {
      const int q = i % nch, rk = i / nch, k = rk % ke, r = rk / ke;
      const S* src = ub + int64_t(idx[r]) * p.u_sl + k * sk + q * V;
      S* dst = tile + (r * ke + k) * g.dp + q * V;
      const int rem = g.d - q * V;
#pragma unroll
      for (int e = 0; e < V; ++e) dst[e] = e < rem ? __ldg(src + e) : E::from_f(0.f);
    }
  }
}

// blog[k*L + r] = init(k, idx[r]) or 0.
__device__ __forceinline__ void init_logits(const RoutingParams& p, const Layout& g, int64_t b,
                                            const int* idx, int nreal, float* blog) {
  const int n = g.K * nreal;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int k = i / nreal, r = i - k * nreal;
    blog[k * g.L + r] =
        p.init ? __ldg(p.init + b * p.init_sb + int64_t(k) * p.init_sk + idx[r]) : 0.f;
  }
}

// dst[k*dp + j] = src[k*d + j] (element type or fp32), 0 for d <= j < dp.
template <class E>
__device__ __forceinline__ void stage_rows_elem(const typename E::S* src, const Layout& g,
                                                float* dst) {
  for (int i = threadIdx.x; i < g.Kdp; i += blockDim.x) {
    const int k = i / g.dp, j = i - k * g.dp;
    dst[i] = j < g.d ? E::to_f(__ldg(src + int64_t(k) * g.d + j)) : 0.f;
  }
}

__device__ __forceinline__ void stage_rows_f32(const float* src, const Layout& g, float* dst) {
  for (int i = threadIdx.x; i < g.Kdp; i += blockDim.x) {
    const int k = i / g.dp, j = i - k * g.dp;
    dst[i] = j < g.d ? __ldg(src + int64_t(k) * g.d + j) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Passes. Each is called by the whole block; the caller syncs after it unless stated.
// ---------------------------------------------------------------------------------------------
// out[k*L + r] (+)= <u(k, r), w[k*dp : (k+1)*dp]> for k < K, r < nreal.
// Groups of G lanes share one (k, r); items are r-major so the groups of a warp read the same
// position (one u row for the shared layout, K adjacent rows per position for per-position).
template <bool ACCUM, class E, int SRC>
__device__ __forceinline__ void dots_pass(const URows<E, SRC>& u, const float* w, float* out,
                                          const Layout& g, int nreal) {
  constexpr int V = E::kVec;
  const int G = g.G, gpw = 32 / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int gsub = lane / G, glane = lane & (G - 1);
  const int n = g.K * nreal;
  for (int base = warp * gpw; base < n; base += nw * gpw) {  // uniform over the warp
    const int item = base + gsub;
    float acc = 0.f;
    int k = 0, r = 0;
    if (item < n) {
      r = item / g.K;
      k = item - r * g.K;
      const float* wk = w + k * g.dp;
      for (int q = glane; q < g.nch; q += G) {
        float x[V], y[V];
        u.load(k, r, q, g.d, x);
        load_f<V>(wk + q * V, y);
#pragma unroll
        for (int e = 0; e < V; ++e) acc = fmaf(x[e], y[e], acc);
      }
    }
    for (int off = G >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (item < n && glane == 0) {
      float* o = out + k * g.L + r;
      if constexpr (ACCUM)
        *o += acc;
      else
        *o = acc;
    }
  }
}

// out[k*dp + :] = sum_{r < nreal} coef[k*L + r] * u(k, r)  (pads come out zero); with keep,
// only the r with keep[r] >= 0 (seq_all: the real positions).
// Thread item i = p*ncol + col: column col = (k, chunk q), positions r = p, p + P, ...
// red: blockDim.x * V floats of scratch. Ends with __syncthreads().
template <class E, int SRC>
__device__ __forceinline__ void wsum_pass(const URows<E, SRC>& u, const float* coef, float* out,
                                          float* red, const Layout& g, int nreal,
                                          const int* keep = nullptr) {
  constexpr int V = E::kVec;
  const int nt = blockDim.x, ncol = g.K * g.nch;
  int P = 1;
  if (ncol <= nt) {
    P = nt / ncol;
    if (P > nreal) P = nreal > 0 ? nreal : 1;
  }
  const int n = ncol * P;
  for (int i = threadIdx.x; i < n; i += nt) {
    const int pp = i / ncol, col = i - pp * ncol, k = col / g.nch, q = col - k * g.nch;
    const float* ck = coef + k * g.L;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    for (int r = pp; r < nreal; r += P) {
      const float cr = (keep == nullptr || keep[r] >= 0) ? ck[r] : 0.f;
      float x[V];
      u.load(k, r, q, g.d, x);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = fmaf(cr, x[e], acc[e]);
    }
    store_f<V>(P > 1 ? red + i * V : out + k * g.dp + q * V, acc);
  }
  __syncthreads();
  if (P > 1) {  // uniform
    for (int col = threadIdx.x; col < ncol; col += nt) {
      const int k = col / g.nch, q = col - k * g.nch;
      float acc[V];
      load_f<V>(red + col * V, acc);
      for (int pp = 1; pp < P; ++pp) {
        float y[V];
        load_f<V>(red + (pp * ncol + col) * V, y);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += y[e];
      }
      store_f<V>(out + k * g.dp + q * V, acc);
    }
    __syncthreads();
  }
}

// c = softmax of x over the interests (per real position) or over the real positions (per
// interest); both (K, L) indexed [k*L + r], r < nreal.
template <bool SEQ>
__device__ __forceinline__ void softmax_pass(const float* x, float* c, const Layout& g,
                                             int nreal) {
  const int K = g.K, L = g.L;
  if constexpr (!SEQ) {
    for (int r = threadIdx.x; r < nreal; r += blockDim.x) {
      float m = x[r];
      for (int k = 1; k < K; ++k) m = fmaxf(m, x[k * L + r]);
      float z = 0.f;
      for (int k = 0; k < K; ++k) {
        const float e = expf(x[k * L + r] - m);
        c[k * L + r] = e;
        z += e;
      }
      const float inv = 1.f / z;
      for (int k = 0; k < K; ++k) c[k * L + r] *= inv;
    }
  } else {
    if (nreal == 0) return;  // uniform: nothing is real, c stays unused
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int k = warp; k < K; k += nw) {
      const float* xk = x + k * L;
      float* ck = c + k * L;
      float m = -FLT_MAX;
      for (int r = lane; r < nreal; r += 32) m = fmaxf(m, xk[r]);
      m = warp_max(m);
      float z = 0.f;
      for (int r = lane; r < nreal; r += 32) {
        const float e = expf(xk[r] - m);
        ck[r] = e;
        z += e;
      }
      z = warp_sum(z);
      const float inv = 1.f / z;
      for (int r = lane; r < nreal; r += 32) ck[r] *= inv;  // entries this lane wrote
    }
  }
}

// v[k] = squash(s[k]) = n / ((1 + n) sqrt(n + eps)) s[k], n = |s[k]|^2; warp per interest.
__device__ __forceinline__ void squash_pass(const float* s, float* v, const Layout& g) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int k = warp; k < g.K; k += nw) {
    const float* sk = s + k * g.dp;
    float n = 0.f;
    for (int j = lane; j < g.dp; j += 32) n = fmaf(sk[j], sk[j], n);
    n = warp_sum(n);
    const float f = n / ((1.f + n) * sqrtf(n + kSquashEps));
    for (int j = lane; j < g.dp; j += 32) v[k * g.dp + j] = f * sk[j];
  }
}

// gs[k] = f(n) gv[k] + 2 f'(n) <s[k], gv[k]> s[k] (routing_core.h's squash_bwd); warp per interest.
__device__ __forceinline__ void squash_bwd_pass(const float* s, const float* gv, float* gs,
                                                const Layout& g) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int k = warp; k < g.K; k += nw) {
    const float* sk = s + k * g.dp;
    const float* gk = gv + k * g.dp;
    float n = 0.f, sg = 0.f;
    for (int j = lane; j < g.dp; j += 32) {
      n = fmaf(sk[j], sk[j], n);
      sg = fmaf(sk[j], gk[j], sg);
    }
    n = warp_sum(n);
    sg = warp_sum(sg);
    const float ne = n + kSquashEps;
    const float sq = sqrtf(ne);
    const float op = 1.f + n;
    const float f = n / (op * sq);
    const float fp = 1.f / (op * sq) - n / (op * op * sq) - 0.5f * n / (op * ne * sq);
    const float coef = 2.f * fp * sg;
    for (int j = lane; j < g.dp; j += 32) gs[k * g.dp + j] = f * gk[j] + coef * sk[j];
  }
}

// gb[k*L + r] += c (gc - sum c gc), the sum over the softmax axis (real positions only).
template <bool SEQ>
__device__ __forceinline__ void softmax_bwd_pass(const float* c, const float* gc, float* gb,
                                                 const Layout& g, int nreal) {
  const int K = g.K, L = g.L;
  if constexpr (!SEQ) {
    for (int r = threadIdx.x; r < nreal; r += blockDim.x) {
      float sum = 0.f;
      for (int k = 0; k < K; ++k) sum += c[k * L + r] * gc[k * L + r];
      for (int k = 0; k < K; ++k) gb[k * L + r] += c[k * L + r] * (gc[k * L + r] - sum);
    }
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int k = warp; k < K; k += nw) {
      const float* ck = c + k * L;
      const float* gck = gc + k * L;
      float sum = 0.f;
      for (int r = lane; r < nreal; r += 32) sum += ck[r] * gck[r];
      sum = warp_sum(sum);
      for (int r = lane; r < nreal; r += 32) gb[k * L + r] += ck[r] * (gck[r] - sum);
    }
  }
}

// The routing iterations (routing_core.h's fwd_iterate): iteration `it` writes c to
// C + it*c_step, s to S + it*s_step, v to V + it*v_step (steps 0: keep the last only).
// blog holds the initial logits on entry (synced). Ends synced. keep: nullptr, or (seq_all)
// pos, whose entry is < 0 at padded positions: C then holds the softmax p there and s sums
// over the real positions only.
template <bool SEQ, class E, int SRC>
__device__ __forceinline__ void fwd_iterations(const URows<E, SRC>& u, const Layout& g, int nreal,
                                               float* blog, float* C, int c_step, float* S,
                                               int s_step, float* V, int v_step, float* red,
                                               const int* keep) {
  for (int it = 0; it < g.T; ++it) {
    float* c = C + it * c_step;
    float* s = S + it * s_step;
    float* v = V + it * v_step;
    if (it > 0) {
      dots_pass<true>(u, V + (it - 1) * v_step, blog, g, nreal);  // b += <u, v_prev>
      __syncthreads();
    }
    softmax_pass<SEQ>(blog, c, g, nreal);
    __syncthreads();
    wsum_pass(u, c, s, red, g, nreal, keep);  // s = sum_l c u (synced)
    squash_pass(s, v, g);
    __syncthreads();
  }
}

// Shared-memory / workspace pointers of this block.
__device__ __forceinline__ float* block_state(const RoutingParams& p, const Layout& g,
                                              unsigned char* smem, bool state_in_smem) {
  return state_in_smem ? reinterpret_cast<float*>(smem + g.u_bytes)
                       : static_cast<float*>(p.workspace) + size_t(blockIdx.x) * g.state_words;
}

template <class E, int SRC, bool SHARED>
__device__ __forceinline__ URows<E, SRC> make_rows(const RoutingParams& p, const Layout& g,
                                                   int64_t b, const int* idx,
                                                   const typename E::S* tile) {
  URows<E, SRC> u;
  if constexpr (SRC == kSmem) {
    (void)p;
    (void)b;
    (void)idx;
    u.base = tile;
    u.sk = SHARED ? 0 : g.dp;
    u.sl = g.ke * g.dp;
  } else {
    (void)tile;
    (void)g;
    u.base = static_cast<const typename E::S*>(p.u) + b * p.u_sb;
    u.sk = SHARED ? 0 : p.u_sk;
    u.sl = p.u_sl;
    u.idx = idx;
  }
  return u;
}

// Common row prologue of the forward and the full backward: compaction, staging, logits.
// Returns nreal; the caller syncs before the tile / logits are read.
template <class E, int SRC, bool SHARED>
__device__ __forceinline__ int row_prologue(const RoutingParams& p, const Layout& g, int64_t b,
                                            float* st, typename E::S* tile, bool vec) {
  int* idx = reinterpret_cast<int*>(st + g.o_idx);
  int* pos = reinterpret_cast<int*>(st + g.o_pos);
  int* nreal_s = reinterpret_cast<int*>(st + g.o_nreal);
  compact_mask(p.mask + b * p.mask_sb, g.L, idx, pos, nreal_s, p.seq_all);
  __syncthreads();
  const int nreal = *nreal_s;
  if constexpr (SRC == kSmem) stage_u<E, SHARED>(p, g, b, idx, nreal, tile, vec);
  init_logits(p, g, b, idx, nreal, st + g.o_blog);
  return nreal;  // caller syncs
}

// ---------------------------------------------------------------------------------------------
// Kernels. Arguments: params, layout, vec (16-byte global accesses), state_in_smem.
// No __launch_bounds__: with it ptxas (CUDA 13) capped some kernels at 32 registers and spilled;
// without, they take 32-96 registers and plan_impl keeps the block within maxThreadsPerBlock.
// ---------------------------------------------------------------------------------------------
template <class E, bool SEQ, bool SHARED, int SRC>
__global__ void
    routing_fwd_kernel(const RoutingParams p, const Layout g, bool vec, bool state_in_smem) {
  using S = typename E::S;
  constexpr int V = E::kVec;
  extern __shared__ __align__(16) unsigned char smem[];
  S* tile = reinterpret_cast<S*>(smem);
  float* st = block_state(p, g, smem, state_in_smem);
  float* blog = st + g.o_blog;
  float* c = st + g.o_c;
  float* s = st + g.o_s;
  float* v = st + g.o_v;
  float* red = st + g.o_red;
  const int* idx = reinterpret_cast<const int*>(st + g.o_idx);
  const int* pos = reinterpret_cast<const int*>(st + g.o_pos);

  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const int nreal = row_prologue<E, SRC, SHARED>(p, g, b, st, tile, vec);
    __syncthreads();
    const URows<E, SRC> u = make_rows<E, SRC, SHARED>(p, g, b, idx, tile);
    fwd_iterations<SEQ>(u, g, nreal, blog, c, 0, s, 0, v, 0, red, p.seq_all ? pos : nullptr);

    // outputs: v (element type), c_last (0 at padded positions), s_last
    S* vo = static_cast<S*>(p.v) + b * g.K * g.d;
    for (int i = threadIdx.x; i < g.K * g.nch; i += blockDim.x) {
      const int k = i / g.nch, q = i - k * g.nch;
      float x[V];
      load_f<V>(v + k * g.dp + q * V, x);
      store_chunk_global_rt<E>(vo + k * g.d + q * V, g.d - q * V, x, vec);
    }
    float* co = p.c_last + b * g.KL;
    for (int i = threadIdx.x; i < g.KL; i += blockDim.x) {
      const int k = i / g.L, l = i - k * g.L, r = pos[l];
      co[i] = r >= 0 ? c[k * g.L + r] : 0.f;
    }
    float* so = p.s_last + b * g.K * g.d;
    for (int i = threadIdx.x; i < g.K * g.d; i += blockDim.x) {
      const int k = i / g.d, j = i - k * g.d;
      so[i] = s[k * g.dp + j];
    }
    __syncthreads();  // the next row overwrites the state
  }
}

// grad_u(k, l) = c_last[k, l] * squash_bwd(s_last[k], grad_v[k]) at real l, 0 at padded l;
// the shared layout sums over k.
template <class E, bool SHARED, bool VEC>
__global__ void
    routing_bwd_detached_kernel(const RoutingParams p, const Layout g, bool /*vec*/,
                                bool state_in_smem) {
  using S = typename E::S;
  constexpr int V = E::kVec;
  extern __shared__ __align__(16) unsigned char smem[];
  float* st = block_state(p, g, smem, state_in_smem);
  float* s = st + g.o_s;
  float* gv = st + g.o_gv;
  float* gs = st + g.o_gs;
  const int K = g.K, L = g.L, nch = g.nch, kout = SHARED ? 1 : K;

  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    stage_rows_f32(p.s_in + b * K * g.d, g, s);
    stage_rows_elem<E>(static_cast<const S*>(p.grad_v) + b * K * g.d, g, gv);
    __syncthreads();
    squash_bwd_pass(s, gv, gs, g);
    __syncthreads();
    const unsigned char* m = reinterpret_cast<const unsigned char*>(p.mask + b * p.mask_sb);
    const float* cb = p.c_in + b * g.KL;
    S* gu = static_cast<S*>(p.grad_u) + b * p.g_sb;
    const int n = L * kout * nch;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int q = i % nch, lk = i / nch, ko = lk % kout, l = lk / kout;
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      if (m[l] != 0) {
        const int k0 = SHARED ? 0 : ko, k1 = SHARED ? K : ko + 1;
        for (int k = k0; k < k1; ++k) {
          const float cf = __ldg(cb + k * L + l);
          float y[V];
          load_f<V>(gs + k * g.dp + q * V, y);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fmaf(cf, y[e], acc[e]);
        }
      }
      store_chunk_global<E, VEC>(gu + (SHARED ? 0 : ko * p.g_sk) + int64_t(l) * p.g_sl + q * V,
                                 g.d - q * V, acc);
    }
    __syncthreads();
  }
}

// Backward through every iteration (routing_core.h's routing_bwd_full_row): recompute the
// iterations keeping c_i, s_i, v_i, run them in reverse, write grad_u once at the end.
template <class E, bool SEQ, bool SHARED, int SRC>
__global__ void
    routing_bwd_full_kernel(const RoutingParams p, const Layout g, bool vec, bool state_in_smem) {
  using S = typename E::S;
  constexpr int V = E::kVec;
  extern __shared__ __align__(16) unsigned char smem[];
  S* tile = reinterpret_cast<S*>(smem);
  float* st = block_state(p, g, smem, state_in_smem);
  float* blog = st + g.o_blog;
  float* C = st + g.o_c;    // T * KL
  float* Sv = st + g.o_s;   // T * Kdp
  float* Vv = st + g.o_v;   // T * Kdp
  float* GS = st + g.o_gs;  // T * Kdp
  float* GB = st + g.o_gb;  // (T-1) * KL: GB_i = gradient w.r.t. the logits of iteration i+1
  float* gb = st + g.o_gbc;
  float* gc = st + g.o_gc;
  float* gv = st + g.o_gv;
  float* red = st + g.o_red;
  const int* idx = reinterpret_cast<const int*>(st + g.o_idx);
  const int* pos = reinterpret_cast<const int*>(st + g.o_pos);
  const int K = g.K, L = g.L, T = g.T, KL = g.KL, Kdp = g.Kdp, nch = g.nch;

  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const int nreal = row_prologue<E, SRC, SHARED>(p, g, b, st, tile, vec);
    stage_rows_elem<E>(static_cast<const S*>(p.grad_v) + b * K * g.d, g, gv);
    for (int i = threadIdx.x; i < KL; i += blockDim.x) gb[i] = 0.f;
    __syncthreads();
    const URows<E, SRC> u = make_rows<E, SRC, SHARED>(p, g, b, idx, tile);
    fwd_iterations<SEQ>(u, g, nreal, blog, C, KL, Sv, Kdp, Vv, Kdp, red,
                        p.seq_all ? pos : nullptr);

    for (int i = T - 1; i >= 0; --i) {
      float* gs = GS + i * Kdp;
      squash_bwd_pass(Sv + i * Kdp, gv, gs, g);  // gv = gradient w.r.t. v_i
      if (i < T - 1)
        for (int t = threadIdx.x; t < KL; t += blockDim.x) GB[i * KL + t] = gb[t];
      __syncthreads();
      if (i == 0) break;  // no gradient w.r.t. init_logits is needed
      dots_pass<false>(u, gs, gc, g, nreal);  // gc = <g_s_i, u>
      __syncthreads();
      if (p.seq_all) {  // d c / d p = m: no coupling gradient at padded positions
        for (int t = threadIdx.x; t < K * nreal; t += blockDim.x) {
          const int k = t / nreal, r = t - k * nreal;
          if (pos[r] < 0) gc[k * L + r] = 0.f;
        }
        __syncthreads();
      }
      softmax_bwd_pass<SEQ>(C + i * KL, gc, gb, g, nreal);  // gb: now w.r.t. logits of iteration i
      __syncthreads();
      wsum_pass(u, gb, gv, red, g, nreal);  // gv = sum_l gb u = gradient w.r.t. v_{i-1} (synced)
    }

    // grad_u(k, l) = sum_i c_i[k, r] gs_i[k] + sum_{i < T-1} GB_i[k, rb] v_i[k], r = pos[l]
    // (the c terms at real positions only), rb = r, or l with seq_all (padded logits count).
    S* gu = static_cast<S*>(p.grad_u) + b * p.g_sb;
    const int kout = SHARED ? 1 : K;
    const int n = L * kout * nch;
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      const int q = t % nch, lk = t / nch, ko = lk % kout, l = lk / kout;
      const int r = pos[l];
      const int rb = p.seq_all ? l : r;
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      if (rb >= 0) {
        const int k0 = SHARED ? 0 : ko, k1 = SHARED ? K : ko + 1;
        for (int k = k0; k < k1; ++k) {
          const int kr = k * L + rb, kq = k * g.dp + q * V;
          for (int i = 0; r >= 0 && i < T; ++i) {
            const float cf = C[i * KL + kr];
            float y[V];
            load_f<V>(GS + i * Kdp + kq, y);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = fmaf(cf, y[e], acc[e]);
          }
          for (int i = 0; i + 1 < T; ++i) {
            const float cf = GB[i * KL + kr];
            float y[V];
            load_f<V>(Vv + i * Kdp + kq, y);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = fmaf(cf, y[e], acc[e]);
          }
        }
      }
      store_chunk_global_rt<E>(gu + (SHARED ? 0 : ko * p.g_sk) + int64_t(l) * p.g_sl + q * V,
                               g.d - q * V, acc, vec);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: plan and launch.
// ---------------------------------------------------------------------------------------------
using KernelFn = void (*)(const RoutingParams, const Layout, bool, bool);

template <class E, bool SEQ, bool SHARED>
KernelFn pick_iterating(Pass pass, int src) {
  if (pass == Pass::kForward) {
    switch (src) {
      case kSmem: return routing_fwd_kernel<E, SEQ, SHARED, kSmem>;
      case kGlobalVec: return routing_fwd_kernel<E, SEQ, SHARED, kGlobalVec>;
      default: return routing_fwd_kernel<E, SEQ, SHARED, kGlobalScalar>;
    }
  }
  switch (src) {
    case kSmem: return routing_bwd_full_kernel<E, SEQ, SHARED, kSmem>;
    case kGlobalVec: return routing_bwd_full_kernel<E, SEQ, SHARED, kGlobalVec>;
    default: return routing_bwd_full_kernel<E, SEQ, SHARED, kGlobalScalar>;
  }
}

template <class E>
KernelFn pick_kernel(Pass pass, bool seq, bool shared, int src, bool vec) {
  if (pass == Pass::kBackwardDetached) {
    if (shared)
      return vec ? routing_bwd_detached_kernel<E, true, true>
                 : routing_bwd_detached_kernel<E, true, false>;
    return vec ? routing_bwd_detached_kernel<E, false, true>
               : routing_bwd_detached_kernel<E, false, false>;
  }
  if (seq)
    return shared ? pick_iterating<E, true, true>(pass, src)
                  : pick_iterating<E, true, false>(pass, src);
  return shared ? pick_iterating<E, false, true>(pass, src)
                : pick_iterating<E, false, false>(pass, src);
}

inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// Threads per block: about four 16-byte chunks of a pass over u per thread, 2 to 8 warps.
inline int auto_threads(Pass pass, const RoutingParams& p, int nch) {
  const int64_t rows = pass == Pass::kBackwardDetached ? (p.shared ? 1 : p.K) * p.L : p.K * p.L;
  const int64_t work = rows * nch;
  int64_t warps = (work + 127) / 128;
  if (warps < 2) warps = 2;
  if (warps > 8) warps = 8;
  return int(warps * 32);
}

inline bool valid_params(Pass pass, const RoutingParams& p) {
  if (p.B < 0 || p.K < 1 || p.L < 1 || p.d < 1 || p.iters < 1 || p.mask == nullptr) return false;
  if (p.threads != 0 && (p.threads < 32 || p.threads > kMaxThreads || p.threads % 32 != 0))
    return false;
  if (p.B == 0) return true;
  switch (pass) {
    case Pass::kForward:
      return p.u && p.v && p.c_last && p.s_last;
    case Pass::kBackwardDetached:
      return p.grad_v && p.c_in && p.s_in && p.grad_u;
    case Pass::kBackwardFull:
      return p.u && p.grad_v && p.grad_u;
  }
  return false;
}

// 16-byte global accesses: every chunk of u / v / grad_v / grad_u the pass touches starts on a
// 16-byte boundary.
inline bool vec_ok(Pass pass, const RoutingParams& p, int V) {
  bool vec = p.d % V == 0;
  if (pass == Pass::kForward || pass == Pass::kBackwardFull) {
    vec = vec && aligned16(p.u) && p.u_sb % V == 0 && p.u_sl % V == 0 &&
          (p.shared || p.u_sk % V == 0);
  }
  if (pass == Pass::kForward) vec = vec && aligned16(p.v);
  if (pass != Pass::kForward) {
    vec = vec && aligned16(p.grad_v) && aligned16(p.grad_u) && p.g_sb % V == 0 &&
          p.g_sl % V == 0 && (p.shared || p.g_sk % V == 0);
  }
  return vec;
}

template <class E>
cudaError_t plan_impl(Pass pass, const RoutingParams& p, RoutingPlan* plan) {
  constexpr int V = E::kVec;
  using S = typename E::S;
  if (plan == nullptr || !valid_params(pass, p)) return cudaErrorInvalidValue;
  RoutingPlan out;
  const int64_t nch = (p.d + V - 1) / V;
  out.threads = p.threads > 0 ? p.threads : auto_threads(pass, p, int(nch));

  const bool vec = vec_ok(pass, p, V);
  out.vec = vec;

  int dev = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;

  // Placement for a thread count: u tile + state in shared memory when both fit, else the state
  // alone, else the state in the global workspace. Fewer threads never need more shared memory.
  size_t state_bytes = 0;
  auto place = [&](int threads) {
    Layout staged_g, flat_g;
    if (!make_layout(pass, p, V, int(sizeof(S)), threads, true, &staged_g) ||
        !make_layout(pass, p, V, int(sizeof(S)), threads, false, &flat_g))
      return false;
    state_bytes = size_t(flat_g.state_words) * 4;
    const size_t staged_bytes = size_t(staged_g.u_bytes) + state_bytes;
    out.threads = threads;
    out.staged = pass != Pass::kBackwardDetached && staged_bytes <= size_t(optin);
    out.state_in_smem = out.staged || state_bytes <= size_t(optin);
    out.smem_bytes = out.staged ? staged_bytes : (out.state_in_smem ? state_bytes : 0);
    return true;
  };
  if (!place(out.threads)) return cudaErrorInvalidValue;
  auto kernel = [&]() {
    const int src = out.staged ? kSmem : (vec ? kGlobalVec : kGlobalScalar);
    return pick_kernel<E>(pass, p.seq_axis, p.shared, src, vec);
  };
  KernelFn fn = kernel();
  if (p.threads == 0) {  // automatic: stay within what the compiled kernel can launch
    cudaFuncAttributes fa;
    err = cudaFuncGetAttributes(&fa, fn);
    if (err != cudaSuccess) return err;
    const int cap = fa.maxThreadsPerBlock / 32 * 32;
    if (cap < 32) return cudaErrorInvalidConfiguration;
    if (out.threads > cap) {
      if (!place(cap)) return cudaErrorInvalidValue;
      fn = kernel();
    }
  }
  err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(out.smem_bytes));
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, out.threads, out.smem_bytes);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int64_t resident = int64_t(per_sm) * sms;
  out.grid = int(p.B < resident ? p.B : resident);
  out.workspace_bytes = out.state_in_smem ? 0 : size_t(out.grid) * state_bytes;
  *plan = out;
  return cudaSuccess;
}

template <class E>
cudaError_t launch_impl(Pass pass, const RoutingParams& p, const RoutingPlan& plan,
                        cudaStream_t stream) {
  constexpr int V = E::kVec;
  using S = typename E::S;
  if (!valid_params(pass, p)) return cudaErrorInvalidValue;
  if (p.B == 0 || plan.grid == 0) return cudaSuccess;
  if (plan.threads < 32 || plan.threads > kMaxThreads || plan.threads % 32 != 0)
    return cudaErrorInvalidValue;
  if (!plan.state_in_smem && (p.workspace == nullptr || !aligned16(p.workspace)))
    return cudaErrorInvalidValue;
  if (plan.staged && pass == Pass::kBackwardDetached) return cudaErrorInvalidValue;
  if (plan.vec && !vec_ok(pass, p, V)) return cudaErrorInvalidValue;  // other pointers than planned
  Layout g;
  if (!make_layout(pass, p, V, int(sizeof(S)), plan.threads, plan.staged, &g))
    return cudaErrorInvalidValue;
  const size_t need = (plan.staged ? size_t(g.u_bytes) : 0) +
                      (plan.state_in_smem ? size_t(g.state_words) * 4 : 0);
  if (need != plan.smem_bytes) return cudaErrorInvalidValue;  // plan made for other params
  if (!plan.state_in_smem && plan.workspace_bytes < size_t(plan.grid) * g.state_words * 4)
    return cudaErrorInvalidValue;
  if (!plan.staged) g.u_bytes = 0;
  const int src = plan.staged ? kSmem : (plan.vec ? kGlobalVec : kGlobalScalar);
  const KernelFn fn = pick_kernel<E>(pass, p.seq_axis, p.shared, src, plan.vec);
  // the attribute is per device: set it again in case the plan was made on another one
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(plan.smem_bytes));
  if (err != cudaSuccess) return err;
  // cudaLaunchKernel rather than <<<>>>: the same host code then also builds with a plain C++
  // compiler (the kernels can be run by a host emulation of the CUDA built-ins).
  RoutingParams pa = p;
  bool vec = plan.vec, in_smem = plan.state_in_smem;
  void* args[] = {&pa, &g, &vec, &in_smem};
  err = cudaLaunchKernel(reinterpret_cast<const void*>(fn), dim3(unsigned(plan.grid)),
                         dim3(unsigned(plan.threads)), args, plan.smem_bytes, stream);
  return err;
}

}  // namespace detail
}  // namespace routing_cuda
}  // namespace seqrec_fast

// Defines the plan / launch entry points of one element type (routing_kernels.h).
#define SEQREC_FAST_ROUTING_CUDA_INSTANTIATE(SUFFIX, ELEM)                                      \
  namespace seqrec_fast {                                                                       \
  namespace routing_cuda {                                                                      \
  cudaError_t routing_cuda_plan_##SUFFIX(Pass pass, const RoutingParams& p, RoutingPlan* plan) { \
    return detail::plan_impl<detail::ELEM>(pass, p, plan);                                      \
  }                                                                                             \
  cudaError_t routing_cuda_launch_##SUFFIX(Pass pass, const RoutingParams& p,                   \
                                           const RoutingPlan& plan, cudaStream_t stream) {      \
    return detail::launch_impl<detail::ELEM>(pass, p, plan, stream);                            \
  }                                                                                             \
  }                                                                                             \
  }
