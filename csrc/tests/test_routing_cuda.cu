// Unit test of the CUDA capsule-routing kernels (csrc/routing/routing_kernels.h): forward,
// detached backward and full backward on fixed and odd shapes, both u layouts (shared /
// per-position, also with padded strides), both softmax axes, fp32 / bf16 / fp16, automatic and
// forced block sizes, against a float64 host implementation written here from the op's
// definition. That reference's full backward is first checked against central finite
// differences of its own forward (this part runs without a GPU too).
//
// Exit code: 0 pass, 1 failure, 77 no CUDA device (ctest SKIP_RETURN_CODE 77).
// Only the runtime API is used here (no kernels, no <<<>>>), so the file is plain C++ as well.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "routing/routing_kernels.h"

namespace rk = seqrec_fast::routing_cuda;

namespace {

int g_failures = 0;
int g_checks = 0;

// ------------------------------------------------------------------------------------------
// Host conversions to / from 16-bit floats, round to nearest even (as torch and the kernels).
// ------------------------------------------------------------------------------------------
uint16_t to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if (std::isnan(f)) return uint16_t((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t x = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.f) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (a < 6.103515625e-05f) {                          // subnormal: multiples of 2^-24
    const double m = std::nearbyint(double(a) * 16777216.0);  // ties to even; 1024 = min normal
    return uint16_t(sign | uint16_t(m));
  }
  int e;
  std::frexp(a, &e);                                        // a = f * 2^e, f in [0.5, 1)
  double m = std::nearbyint(std::ldexp(double(a), 11 - e));  // in [1024, 2048]
  int E = e - 1 + 15;
  if (m >= 2048.0) {
    m = 1024.0;
    ++E;
  }
  if (E >= 31) return uint16_t(sign | 0x7c00u);
  return uint16_t(sign | uint16_t(E << 10) | uint16_t(int(m) - 1024));
}

float from_f16(uint16_t h) {
  const int E = (h >> 10) & 31, frac = h & 1023;
  const double s = (h & 0x8000u) ? -1.0 : 1.0;
  if (E == 0) return float(s * std::ldexp(double(frac), -24));
  if (E == 31) return frac ? NAN : float(s * INFINITY);
  return float(s * std::ldexp(double(1024 + frac), E - 25));
}

int elem_bytes(rk::DType dt) { return dt == rk::DType::kFloat32 ? 4 : 2; }

const char* dtype_name(rk::DType dt) {
  return dt == rk::DType::kFloat32 ? "fp32" : (dt == rk::DType::kBFloat16 ? "bf16" : "fp16");
}

// Rounds x to the element type; stores its bits at dst (elem_bytes(dt) bytes); returns the value.
double store_elem(rk::DType dt, double x, unsigned char* dst) {
  const float f = float(x);
  if (dt == rk::DType::kFloat32) {
    std::memcpy(dst, &f, 4);
    return f;
  }
  const uint16_t h = dt == rk::DType::kBFloat16 ? to_bf16(f) : to_f16(f);
  std::memcpy(dst, &h, 2);
  return dt == rk::DType::kBFloat16 ? from_bf16(h) : from_f16(h);
}

double load_elem(rk::DType dt, const unsigned char* src) {
  if (dt == rk::DType::kFloat32) {
    float f;
    std::memcpy(&f, src, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, src, 2);
  return dt == rk::DType::kBFloat16 ? from_bf16(h) : from_f16(h);
}

// ------------------------------------------------------------------------------------------
// Reference on one row in double, from the definition. u dense (K, L, d): u[(k*L + l)*d + j].
// ------------------------------------------------------------------------------------------
constexpr double kEps = 1e-9;

struct RefFwd {
  int K = 0, L = 0, d = 0, T = 0;
  std::vector<double> P, C, S, V;  // per iteration: softmax p and c = p*mask (K, L); s, v (K, d)
};

// all (with seq): torch-rechub's sequence softmax over all L positions, padded ones included.
RefFwd ref_forward(int K, int L, int d, int T, bool seq, const double* u, const char* mask,
                   const double* init, bool all = false) {
  RefFwd f;
  f.K = K;
  f.L = L;
  f.d = d;
  f.T = T;
  std::vector<double> b(size_t(K) * L, 0.0);
  if (init) b.assign(init, init + size_t(K) * L);
  for (int it = 0; it < T; ++it) {
    std::vector<double> p(size_t(K) * L, 0.0), c(size_t(K) * L), s(size_t(K) * d),
        v(size_t(K) * d);
    if (!seq) {
      for (int l = 0; l < L; ++l) {
        double mx = -1e300, z = 0;
        for (int k = 0; k < K; ++k) mx = std::max(mx, b[k * L + l]);
        for (int k = 0; k < K; ++k) z += std::exp(b[k * L + l] - mx);
        for (int k = 0; k < K; ++k) p[k * L + l] = std::exp(b[k * L + l] - mx) / z;
      }
    } else {
      for (int k = 0; k < K; ++k) {
        double mx = -1e300, z = 0;
        bool any = false;
        for (int l = 0; l < L; ++l)
          if (mask[l] || all) {
            mx = std::max(mx, b[k * L + l]);
            any = true;
          }
        if (!any) continue;  // every position padded: p = 0
        for (int l = 0; l < L; ++l)
          if (mask[l] || all) z += std::exp(b[k * L + l] - mx);
        for (int l = 0; l < L; ++l)
          if (mask[l] || all) p[k * L + l] = std::exp(b[k * L + l] - mx) / z;
      }
    }
    for (int i = 0; i < K * L; ++i) c[i] = mask[i % L] ? p[i] : 0.0;
    for (int k = 0; k < K; ++k) {
      double n = 0;
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        for (int l = 0; l < L; ++l) acc += c[k * L + l] * u[(size_t(k) * L + l) * d + j];
        s[k * d + j] = acc;
        n += acc * acc;
      }
      const double fct = n / (1 + n) / std::sqrt(n + kEps);
      for (int j = 0; j < d; ++j) v[k * d + j] = fct * s[k * d + j];
    }
    if (it < T - 1)
      for (int k = 0; k < K; ++k)
        for (int l = 0; l < L; ++l) {
          double dot = 0;
          for (int j = 0; j < d; ++j) dot += u[(size_t(k) * L + l) * d + j] * v[k * d + j];
          b[k * L + l] += dot;
        }
    f.P.insert(f.P.end(), p.begin(), p.end());
    f.C.insert(f.C.end(), c.begin(), c.end());
    f.S.insert(f.S.end(), s.begin(), s.end());
    f.V.insert(f.V.end(), v.begin(), v.end());
  }
  return f;
}

// g_s = f(n) g_v + 2 f'(n) <s, g_v> s
void ref_squash_bwd(const double* s, const double* gv, double* gs, int d) {
  double n = 0, sg = 0;
  for (int j = 0; j < d; ++j) {
    n += s[j] * s[j];
    sg += s[j] * gv[j];
  }
  const double ne = n + kEps, op = 1 + n;
  const double f = n / (op * std::sqrt(ne));
  const double fp = 1 / (op * std::sqrt(ne)) - n / (op * op * std::sqrt(ne)) -
                    0.5 * n / (op * std::pow(ne, 1.5));
  for (int j = 0; j < d; ++j) gs[j] = f * gv[j] + 2 * fp * sg * s[j];
}

// Gradient of sum(grad_v * v_last) w.r.t. dense u (K, L, d).
// detach: through the last iteration's s only (c_last constant); else through every iteration.
std::vector<double> ref_backward(const RefFwd& f, bool seq, bool detach, const double* u,
                                 const char* mask, const double* grad_v) {
  const int K = f.K, L = f.L, d = f.d, T = f.T;
  const size_t KL = size_t(K) * L, Kd = size_t(K) * d;
  std::vector<double> grad(KL * d, 0.0), gb(KL, 0.0), gv(grad_v, grad_v + Kd), gs(Kd);
  for (int i = T - 1; i >= 0; --i) {
    const double* c = &f.C[i * KL];
    const double* p = &f.P[i * KL];
    const double* S = &f.S[i * Kd];
    const double* V = &f.V[i * Kd];
    for (int k = 0; k < K; ++k) ref_squash_bwd(S + k * d, &gv[k * d], &gs[k * d], d);
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < L; ++l)
        for (int j = 0; j < d; ++j)
          grad[(size_t(k) * L + l) * d + j] +=
              c[k * L + l] * gs[k * d + j] + (i < T - 1 ? gb[k * L + l] * V[k * d + j] : 0.0);
    if (detach || i == 0) break;
    std::vector<double> gc(KL, 0.0), gp(KL, 0.0);
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < L; ++l) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += gs[k * d + j] * u[(size_t(k) * L + l) * d + j];
        gc[k * L + l] = mask[l] ? dot : 0.0;
      }
    if (!seq) {
      for (int l = 0; l < L; ++l) {
        double sum = 0;
        for (int k = 0; k < K; ++k) sum += p[k * L + l] * gc[k * L + l];
        for (int k = 0; k < K; ++k) gp[k * L + l] = p[k * L + l] * (gc[k * L + l] - sum);
      }
    } else {
      for (int k = 0; k < K; ++k) {
        double sum = 0;
        for (int l = 0; l < L; ++l) sum += p[k * L + l] * gc[k * L + l];
        for (int l = 0; l < L; ++l) gp[k * L + l] = p[k * L + l] * (gc[k * L + l] - sum);
      }
    }
    for (size_t t = 0; t < KL; ++t) gb[t] += gp[t];
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        for (int l = 0; l < L; ++l) acc += gb[k * L + l] * u[(size_t(k) * L + l) * d + j];
        gv[k * d + j] = acc;
      }
  }
  return grad;
}

// The reference's full backward against central differences of its forward.
bool check_reference_gradient() {
  std::mt19937 gen(7);
  std::normal_distribution<double> nd(0.0, 0.7);
  bool ok = true;
  for (int seq = 0; seq < 3; ++seq) {  // interest, sequence (real positions), sequence (all)
    const int K = 3, L = 5, d = 4, T = 3;
    std::vector<double> u(size_t(K) * L * d), init(size_t(K) * L), gv(size_t(K) * d);
    for (auto& x : u) x = nd(gen);
    for (auto& x : init) x = nd(gen);
    for (auto& x : gv) x = nd(gen);
    const char mask[L] = {1, 0, 1, 1, 0};
    auto loss = [&](const std::vector<double>& uu) {
      const RefFwd f = ref_forward(K, L, d, T, seq > 0, uu.data(), mask, init.data(), seq == 2);
      double acc = 0;
      for (int t = 0; t < K * d; ++t) acc += gv[t] * f.V[size_t(T - 1) * K * d + t];
      return acc;
    };
    const RefFwd f = ref_forward(K, L, d, T, seq > 0, u.data(), mask, init.data(), seq == 2);
    const std::vector<double> g = ref_backward(f, seq > 0, false, u.data(), mask, gv.data());
    double worst = 0;
    for (size_t t = 0; t < u.size(); ++t) {
      std::vector<double> up = u, um = u;
      const double h = 1e-6;
      up[t] += h;
      um[t] -= h;
      const double fd = (loss(up) - loss(um)) / (2 * h);
      worst = std::max(worst, std::fabs(fd - g[t]) / (1e-3 + std::fabs(fd)));
    }
    ++g_checks;
    if (!(worst < 1e-5)) {
      std::printf("FAIL reference gradient vs finite differences (seq_axis=%d): rel err %.3e\n",
                  seq, worst);
      ++g_failures;
      ok = false;
    }
  }
  return ok;
}

// ------------------------------------------------------------------------------------------
// Device helpers.
// ------------------------------------------------------------------------------------------
#define CUDA_OK(expr)                                                                         \
  do {                                                                                        \
    const cudaError_t err_ = (expr);                                                          \
    if (err_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, __LINE__, \
                  #expr);                                                                     \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

struct DevBuf {
  void* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t bytes) : n(bytes) {
    if (bytes) CUDA_OK(cudaMalloc(&p, bytes));
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  void put(const void* src) { if (n) CUDA_OK(cudaMemcpy(p, src, n, cudaMemcpyHostToDevice)); }
  void get(void* dst) const { if (n) CUDA_OK(cudaMemcpy(dst, p, n, cudaMemcpyDeviceToHost)); }
};

struct Case {
  int B, K, L, d, T;
  bool seq, shared, full, init;
  rk::DType dt;
  int threads;  // 0: automatic
  int pad;      // extra elements on the row stride of u (padded, non-contiguous layout)
  unsigned seed;
  bool all = false;  // with seq: torch-rechub's softmax over all L positions
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "B=%d K=%d L=%d d=%d T=%d %s %s %s %s init=%d threads=%d pad=%d", c.B, c.K, c.L,
                c.d, c.T, dtype_name(c.dt), c.shared ? "shared" : "per_position",
                c.all ? "seq_axis(all)" : (c.seq ? "seq_axis" : "interest_axis"),
                c.full ? "full" : "detach", int(c.init), c.threads, c.pad);
  return buf;
}

// Compares got vs want (same length): |got - want| <= atol * max|want| + rtol * |want|.
bool compare(const char* what, const Case& c, const std::vector<double>& got,
             const std::vector<double>& want, double atol, double rtol) {
  ++g_checks;
  double scale = 1e-3, worst = 0;
  size_t at = 0, bad = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    const double lim = atol * scale + rtol * std::fabs(want[i]);
    if (!(err <= lim)) {  // NaN fails
      if (bad == 0 || !(err <= worst)) {
        worst = err;
        at = i;
      }
      ++bad;
    }
  }
  if (bad) {
    std::printf("FAIL %s [%s]: %zu of %zu wrong, worst at %zu: got %.7g want %.7g (scale %.3g)\n",
                what, describe(c).c_str(), bad, want.size(), at, got[at], want[at], scale);
    ++g_failures;
    return false;
  }
  return true;
}

// Runs one pass: plan, workspace, launch, synchronize. Returns the plan.
rk::RoutingPlan run_pass(rk::Pass pass, rk::DType dt, rk::RoutingParams p) {
  rk::RoutingPlan plan;
  CUDA_OK(rk::routing_cuda_plan(pass, dt, p, &plan));
  DevBuf ws(plan.workspace_bytes);
  p.workspace = ws.p;
  CUDA_OK(rk::routing_cuda_launch(pass, dt, p, plan, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  return plan;
}

void run_case(const Case& c) {
  const int B = c.B, K = c.K, L = c.L, d = c.d, T = c.T;
  const int es = elem_bytes(c.dt);
  std::mt19937 gen(c.seed);
  std::normal_distribution<double> nd(0.0, 0.7);
  std::bernoulli_distribution coin(0.7);

  // mask: row 0 all real, the last row all padded (B >= 3), the rest random
  std::vector<char> mask(size_t(B) * L);
  for (int b = 0; b < B; ++b)
    for (int l = 0; l < L; ++l)
      mask[size_t(b) * L + l] = b == 0 ? 1 : ((B >= 3 && b == B - 1) ? 0 : char(coin(gen)));

  // u in the kernel layout (with `pad` extra elements per row), and dense (B, K, L, d) doubles
  const int64_t row = d + c.pad;
  int64_t sb, sk, sl, n_elems;
  if (c.shared) {  // (B, L, row)
    sl = row;
    sb = int64_t(L) * row;
    sk = 0;
    n_elems = int64_t(B) * sb;
  } else {  // (L, B, K, row)
    sk = row;
    sb = int64_t(K) * row;
    sl = int64_t(B) * sb;
    n_elems = int64_t(L) * sl;
  }
  std::vector<unsigned char> u_bits(size_t(n_elems) * es, 0);
  std::vector<double> u_dense(size_t(B) * K * L * d);
  for (int b = 0; b < B; ++b)
    for (int l = 0; l < L; ++l)
      for (int k = 0; k < (c.shared ? 1 : K); ++k)
        for (int j = 0; j < d; ++j) {
          const int64_t off = b * sb + k * sk + l * sl + j;
          const double x = store_elem(c.dt, nd(gen), &u_bits[size_t(off) * es]);
          for (int kk = (c.shared ? 0 : k); kk < (c.shared ? K : k + 1); ++kk)
            u_dense[((size_t(b) * K + kk) * L + l) * d + j] = x;
        }
  std::vector<float> init(size_t(B) * K * L);
  for (auto& x : init) x = float(nd(gen) * 1.4);
  std::vector<unsigned char> gv_bits(size_t(B) * K * d * es);
  std::vector<double> gv(size_t(B) * K * d);
  for (size_t i = 0; i < gv.size(); ++i) gv[i] = store_elem(c.dt, nd(gen), &gv_bits[i * es]);

  DevBuf d_u(u_bits.size()), d_mask(mask.size()), d_init(init.size() * 4),
      d_v(size_t(B) * K * d * es), d_c(size_t(B) * K * L * 4), d_s(size_t(B) * K * d * 4),
      d_gv(gv_bits.size());
  d_u.put(u_bits.data());
  d_mask.put(mask.data());
  d_init.put(init.data());
  d_gv.put(gv_bits.data());
  CUDA_OK(cudaMemset(d_v.p, 0xff, d_v.n));  // NaN patterns: every output must be written
  CUDA_OK(cudaMemset(d_c.p, 0xff, d_c.n));
  CUDA_OK(cudaMemset(d_s.p, 0xff, d_s.n));

  rk::RoutingParams p;
  p.B = B;
  p.K = K;
  p.L = L;
  p.d = d;
  p.iters = T;
  p.seq_axis = c.seq;
  p.seq_all = c.all;
  p.shared = c.shared;
  p.u = d_u.p;
  p.u_sb = sb;
  p.u_sk = sk;
  p.u_sl = sl;
  p.mask = static_cast<const bool*>(d_mask.p);
  p.mask_sb = L;
  if (c.init) {
    p.init = static_cast<const float*>(d_init.p);
    p.init_sb = int64_t(K) * L;
    p.init_sk = L;
  }
  p.v = d_v.p;
  p.c_last = static_cast<float*>(d_c.p);
  p.s_last = static_cast<float*>(d_s.p);
  p.threads = c.threads;
  const rk::RoutingPlan fplan = run_pass(rk::Pass::kForward, c.dt, p);

  std::vector<unsigned char> v_bits(d_v.n);
  std::vector<float> c_got(size_t(B) * K * L), s_got(size_t(B) * K * d);
  d_v.get(v_bits.data());
  d_c.get(c_got.data());
  d_s.get(s_got.data());

  // reference, row by row
  std::vector<double> v_want, c_want, s_want, gu_want;
  std::vector<double> init_d(init.begin(), init.end());
  const size_t gu_elems = c.shared ? size_t(B) * L * d : size_t(L) * B * K * d;
  gu_want.assign(gu_elems, 0.0);
  for (int b = 0; b < B; ++b) {
    const double* ub = &u_dense[size_t(b) * K * L * d];
    const char* mb = &mask[size_t(b) * L];
    const double* ib = c.init ? &init_d[size_t(b) * K * L] : nullptr;
    const RefFwd f = ref_forward(K, L, d, T, c.seq, ub, mb, ib, c.all);
    const size_t KL = size_t(K) * L, Kd = size_t(K) * d;
    v_want.insert(v_want.end(), f.V.begin() + (T - 1) * Kd, f.V.begin() + T * Kd);
    c_want.insert(c_want.end(), f.C.begin() + (T - 1) * KL, f.C.begin() + T * KL);
    s_want.insert(s_want.end(), f.S.begin() + (T - 1) * Kd, f.S.begin() + T * Kd);
    const std::vector<double> g = ref_backward(f, c.seq, !c.full, ub, mb, &gv[size_t(b) * Kd]);
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < L; ++l)
        for (int j = 0; j < d; ++j) {
          const double x = g[(size_t(k) * L + l) * d + j];
          if (c.shared)
            gu_want[(size_t(b) * L + l) * d + j] += x;
          else
            gu_want[((size_t(l) * B + b) * K + k) * d + j] = x;
        }
  }

  // tolerances: fp32 arithmetic (amplified a little by the iterations), plus one rounding of
  // the 16-bit outputs
  const double atol = 2e-4, rtol = 1e-3;
  const double rtol_out = c.dt == rk::DType::kFloat32
                              ? rtol
                              : (c.dt == rk::DType::kBFloat16 ? 1.0 / 128 : 1.0 / 512);
  std::vector<double> v_got(v_want.size());
  for (size_t i = 0; i < v_got.size(); ++i) v_got[i] = load_elem(c.dt, &v_bits[i * es]);
  compare("v", c, v_got, v_want, atol, rtol_out);
  compare("c_last", c, std::vector<double>(c_got.begin(), c_got.end()), c_want, atol, rtol);
  compare("s_last", c, std::vector<double>(s_got.begin(), s_got.end()), s_want, atol, rtol);
  // exact zeros: c_last at padded positions, everything of an all-padded row
  ++g_checks;
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < L; ++l)
        if (!mask[size_t(b) * L + l] && c_got[(size_t(b) * K + k) * L + l] != 0.f) {
          std::printf("FAIL c_last not 0 at padded (b=%d k=%d l=%d) [%s]\n", b, k, l,
                      describe(c).c_str());
          ++g_failures;
          b = B;
          k = K;
          break;
        }

  // backward
  DevBuf d_gu(gu_elems * es);
  CUDA_OK(cudaMemset(d_gu.p, 0xff, d_gu.n));
  rk::RoutingParams q;
  q.B = B;
  q.K = K;
  q.L = L;
  q.d = d;
  q.iters = T;
  q.seq_axis = c.seq;
  q.seq_all = c.all;
  q.shared = c.shared;
  q.mask = p.mask;
  q.mask_sb = L;
  q.grad_v = d_gv.p;
  q.grad_u = d_gu.p;
  q.g_sb = c.shared ? int64_t(L) * d : int64_t(K) * d;
  q.g_sk = c.shared ? 0 : d;
  q.g_sl = c.shared ? d : int64_t(B) * K * d;
  q.threads = c.threads;
  rk::RoutingPlan bplan;
  if (c.full) {
    q.u = p.u;
    q.u_sb = sb;
    q.u_sk = sk;
    q.u_sl = sl;
    q.init = p.init;
    q.init_sb = p.init_sb;
    q.init_sk = p.init_sk;
    bplan = run_pass(rk::Pass::kBackwardFull, c.dt, q);
  } else {
    q.c_in = p.c_last;
    q.s_in = p.s_last;
    bplan = run_pass(rk::Pass::kBackwardDetached, c.dt, q);
  }
  std::vector<unsigned char> gu_bits(d_gu.n);
  d_gu.get(gu_bits.data());
  std::vector<double> gu_got(gu_elems);
  for (size_t i = 0; i < gu_elems; ++i) gu_got[i] = load_elem(c.dt, &gu_bits[i * es]);
  compare("grad_u", c, gu_got, gu_want, atol, rtol_out);

  std::printf("ok   %-95s fwd[t=%d g=%d smem=%zu staged=%d ws=%zu vec=%d] "
              "bwd[t=%d g=%d smem=%zu staged=%d ws=%zu]\n",
              describe(c).c_str(), fplan.threads, fplan.grid, fplan.smem_bytes, int(fplan.staged),
              fplan.workspace_bytes, int(fplan.vec), bplan.threads, bplan.grid, bplan.smem_bytes,
              int(bplan.staged), bplan.workspace_bytes);
}

// Bad parameters are refused, not launched.
void check_refusals() {
  rk::RoutingParams p;
  rk::RoutingPlan plan;
  p.B = 1;
  p.K = 0;  // K < 1
  ++g_checks;
  if (rk::routing_cuda_plan(rk::Pass::kForward, rk::DType::kFloat32, p, &plan) == cudaSuccess) {
    std::printf("FAIL plan accepted K = 0\n");
    ++g_failures;
  }
  p.K = 2;
  p.threads = 48;  // not a multiple of 32
  ++g_checks;
  if (rk::routing_cuda_plan(rk::Pass::kForward, rk::DType::kFloat32, p, &plan) == cudaSuccess) {
    std::printf("FAIL plan accepted threads = 48 (and null pointers)\n");
    ++g_failures;
  }
}

}  // namespace

int main() {
  check_reference_gradient();
  if (g_failures) {
    std::printf("%d of %d checks failed (host reference)\n", g_failures, g_checks);
    return 1;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("reference checks passed; no CUDA device: skipping the kernel tests\n");
    return 77;
  }
  check_refusals();

  const int shapes[][5] = {  // B, K, L, d, T
      {3, 4, 20, 16, 3}, {4, 7, 37, 24, 3}, {5, 1, 1, 16, 3},  {2, 3, 9, 8, 1},
      {3, 2, 13, 17, 2}, {3, 8, 50, 64, 3}, {2, 5, 7, 40, 4},  {1, 4, 33, 256, 3},
      {6, 3, 5, 4, 3},   {2, 2, 64, 33, 3}, {4, 4, 50, 64, 3}, {3, 6, 29, 48, 2}};
  const int nshapes = int(sizeof(shapes) / sizeof(shapes[0]));
  const int threads[] = {0, 32, 64, 0, 128, 96, 256, 0};
  const int pads[] = {0, 0, 8, 1};
  const rk::DType dts[] = {rk::DType::kFloat32, rk::DType::kBFloat16, rk::DType::kFloat16};
  std::vector<Case> cases;
  unsigned seed = 1;
  int n = 0;
  for (rk::DType dt : dts)
    for (int shared = 0; shared < 2; ++shared)
      for (int seq = 0; seq < 2; ++seq)
        for (int full = 0; full < 2; ++full)
          for (int rep = 0; rep < 2; ++rep, ++n) {
            const int* s = shapes[(n * 5 + rep) % nshapes];
            cases.push_back(Case{s[0], s[1], s[2], s[3], s[4], bool(seq), bool(shared),
                                 bool(full), (n % 2) == 0, dt, threads[n % 8], pads[n % 4],
                                 seed++});
          }
  // torch-rechub's sequence softmax (padded logits in the denominator), every dtype and layout
  for (rk::DType dt : dts)
    for (int shared = 0; shared < 2; ++shared)
      for (int full = 0; full < 2; ++full, ++n) {
        const int* s = shapes[(n * 3) % nshapes];
        Case cs{s[0], s[1], s[2], s[3], s[4], true, bool(shared), bool(full), (n % 2) == 0, dt,
                threads[n % 8], pads[n % 4], seed++};
        cs.all = true;
        cases.push_back(cs);
      }
  // every shape at least once, fp32 and bf16, both layouts
  for (int i = 0; i < nshapes; ++i)
    for (int shared = 0; shared < 2; ++shared) {
      const int* s = shapes[i];
      cases.push_back(Case{s[0], s[1], s[2], s[3], s[4], bool(i % 2), bool(shared),
                           bool(i % 3 == 0), true,
                           i % 2 ? rk::DType::kBFloat16 : rk::DType::kFloat32, 0, 0, seed++});
    }
  // u too large for shared memory (per-position fp32: 8*400*24*4 B = 307 KB): streamed from L2
  for (int full = 0; full < 2; ++full)
    cases.push_back(Case{3, 8, 400, 24, 3, false, false, bool(full), true, rk::DType::kFloat32, 0,
                         0, seed++});
  cases.push_back(Case{3, 8, 400, 24, 3, true, false, false, false, rk::DType::kFloat32, 0, 1,
                       seed++});  // streamed, scalar loads
  // state too large for shared memory (full backward, 8 iterations, K*L = 5600): workspace
  cases.push_back(Case{2, 8, 700, 16, 8, false, false, true, true, rk::DType::kFloat32, 0, 0,
                       seed++});
  cases.push_back(Case{2, 8, 700, 16, 8, true, true, true, false, rk::DType::kBFloat16, 0, 0,
                       seed++});
  // many rows: more rows than resident blocks (persistent loop)
  cases.push_back(Case{3000, 4, 20, 16, 3, false, true, false, true, rk::DType::kFloat32, 0, 0,
                       seed++});

  // SEQREC_FAST_TEST_FILTER=<substring>: run only the cases whose description contains it
  // (!<substring>: only those that do not)
  const char* filter = std::getenv("SEQREC_FAST_TEST_FILTER");
  const bool negate = filter != nullptr && filter[0] == '!';
  const std::string pattern = filter ? std::string(filter + (negate ? 1 : 0)) : std::string();
  size_t ran = 0;
  for (const Case& c : cases)
    if (filter == nullptr || (describe(c).find(pattern) != std::string::npos) != negate) {
      run_case(c);
      ++ran;
    }
  if (g_failures) {
    std::printf("%d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  std::printf("all %d checks passed (%zu cases)\n", g_checks, ran);
  return 0;
}
