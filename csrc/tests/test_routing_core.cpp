// Unit tests of csrc/routing/routing_core.h without any framework: a plain main() that returns
// non-zero on failure. The kernel (float, double, and a float wrapper type that goes through the
// conversion path) is compared with a naive double implementation written here from the op's
// definition; gradients are checked against central finite differences of that naive forward.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "routing/routing_core.h"

namespace rc = seqrec_fast::routing;

namespace {

int g_failures = 0;
int g_checks = 0;

// A float stored in a wrapper: not the accumulation type, so the kernel converts rows of u into
// scratch (the path at::BFloat16 / at::Half take), but exact, so float tolerances apply.
struct Boxed {
  float x = 0.f;
  Boxed() = default;
  explicit Boxed(float v) : x(v) {}
  explicit operator float() const { return x; }
};

// ------------------------------------------------------------------------------------------
// Naive reference on one row, straight from the definition, in double.
// u: dense (K, L, d) (the caller expands the shared layout); mask: L; init: (K, L) or empty.
// u_route is the u the logit updates and the couplings see, u_last the u the s of the last
// iteration sums: both are u without detach; with detach the gradient flows through u_last only.
// seq_all (torch-rechub): the sequence softmax runs over all L positions, padded ones included.
// ------------------------------------------------------------------------------------------
struct NaiveOut {
  std::vector<double> v, c, s;  // v (K, d), c_last (K, L), s_last (K, d)
};

NaiveOut naive_forward(int K, int L, int d, int iters, bool seq_axis, bool seq_all,
                       const std::vector<double>& u_route, const std::vector<double>& u_last,
                       const std::vector<char>& mask, const std::vector<double>& init) {
  auto U = [&](const std::vector<double>& u, int k, int l, int j) {
    return u[(size_t(k) * L + l) * d + j];
  };
  std::vector<double> b(size_t(K) * L, 0.0), c(size_t(K) * L), s(size_t(K) * d), v(size_t(K) * d);
  if (!init.empty()) b = init;
  for (int it = 0; it < iters; ++it) {
    const bool last = it == iters - 1;
    if (!seq_axis) {
      for (int l = 0; l < L; ++l) {
        double mx = -1e300;
        for (int k = 0; k < K; ++k) mx = std::max(mx, b[k * L + l]);
        double z = 0;
        for (int k = 0; k < K; ++k) z += std::exp(b[k * L + l] - mx);
        for (int k = 0; k < K; ++k) c[k * L + l] = std::exp(b[k * L + l] - mx) / z;
      }
    } else {
      for (int k = 0; k < K; ++k) {
        double mx = -1e300;
        bool any = false;
        for (int l = 0; l < L; ++l)
          if (mask[l] || seq_all) { mx = std::max(mx, b[k * L + l]); any = true; }
        double z = 0;
        for (int l = 0; l < L; ++l)
          if (mask[l] || seq_all) z += std::exp(b[k * L + l] - mx);
        for (int l = 0; l < L; ++l)
          c[k * L + l] = (any && mask[l]) ? std::exp(b[k * L + l] - mx) / z : 0.0;
      }
    }
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < L; ++l)
        if (!mask[l]) c[k * L + l] = 0.0;
    const std::vector<double>& us = last ? u_last : u_route;
    for (int k = 0; k < K; ++k) {
      double n = 0;
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        for (int l = 0; l < L; ++l) acc += c[k * L + l] * U(us, k, l, j);
        s[k * d + j] = acc;
        n += acc * acc;
      }
      const double f = n / (1 + n) / std::sqrt(n + 1e-9);
      for (int j = 0; j < d; ++j) v[k * d + j] = f * s[k * d + j];
    }
    if (!last)
      for (int k = 0; k < K; ++k)
        for (int l = 0; l < L; ++l) {
          double dt = 0;
          for (int j = 0; j < d; ++j) dt += U(u_route, k, l, j) * v[k * d + j];
          b[k * L + l] += dt;
        }
  }
  return {v, c, s};
}

// ------------------------------------------------------------------------------------------
// A test problem: B rows laid out as the binding lays them out.
//   shared:        u (B, L, d)      sUb = L*d, sUk = 0, sUl = d;  grad_u (B, L, d)
//   per_position:  u (L, B, K, d)   sUb = K*d, sUk = d, sUl = B*K*d; grad_u (L, B, K, d)
// ------------------------------------------------------------------------------------------
struct Case {
  int B, K, L, d, iters;
  bool shared, seq_axis, detach, with_init;
  double pad;  // probability of a padded position
  bool seq_all = false;  // with seq_axis: torch-rechub's softmax over all L positions
  std::string name() const {
    char buf[200];
    std::snprintf(buf, sizeof buf, "B=%d K=%d L=%d d=%d T=%d %s %s %s %s", B, K, L, d, iters,
                  shared ? "shared" : "per_position",
                  seq_all ? "sequence(all)" : (seq_axis ? "sequence" : "interest"),
                  detach ? "detach" : "no-detach", with_init ? "init" : "no-init");
    return buf;
  }
};

struct Problem {
  Case cs;
  std::vector<double> u;        // in the layout above
  std::vector<char> mask;       // (B, L)
  std::vector<double> init;     // (B, K, L) or empty
  std::vector<double> grad_v;   // (B, K, d)
  int64_t sUb, sUk, sUl;
  size_t u_size() const { return u.size(); }
  size_t uidx(int b, int k, int l, int j) const {
    return size_t(b * sUb + (cs.shared ? 0 : k) * sUk + l * sUl + j);
  }
};

Problem make_problem(const Case& cs, std::mt19937& rng) {
  Problem p;
  p.cs = cs;
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  const int B = cs.B, K = cs.K, L = cs.L, d = cs.d;
  if (cs.shared) {
    p.u.resize(size_t(B) * L * d);
    p.sUb = int64_t(L) * d; p.sUk = 0; p.sUl = d;
  } else {
    p.u.resize(size_t(L) * B * K * d);
    p.sUb = int64_t(K) * d; p.sUk = d; p.sUl = int64_t(B) * K * d;
  }
  for (auto& x : p.u) x = nd(rng);
  p.mask.resize(size_t(B) * L);
  for (auto& m : p.mask) m = ud(rng) >= cs.pad;
  if (B > 1)  // row 0 all padded, row 1 all real
    for (int l = 0; l < L; ++l) { p.mask[l] = 0; p.mask[L + l] = 1; }
  if (cs.with_init) {
    p.init.resize(size_t(B) * K * L);
    for (auto& x : p.init) x = nd(rng);
  }
  p.grad_v.resize(size_t(B) * K * d);
  for (auto& x : p.grad_v) x = nd(rng);
  return p;
}

// Dense (K, L, d) u of row b.
std::vector<double> dense_row(const Problem& p, const std::vector<double>& u, int b) {
  const Case& cs = p.cs;
  std::vector<double> out(size_t(cs.K) * cs.L * cs.d);
  for (int k = 0; k < cs.K; ++k)
    for (int l = 0; l < cs.L; ++l)
      for (int j = 0; j < cs.d; ++j) out[(size_t(k) * cs.L + l) * cs.d + j] = u[p.uidx(b, k, l, j)];
  return out;
}

std::vector<char> row_mask(const Problem& p, int b) {
  return std::vector<char>(p.mask.begin() + size_t(b) * p.cs.L,
                           p.mask.begin() + size_t(b + 1) * p.cs.L);
}

std::vector<double> row_init(const Problem& p, int b) {
  if (p.init.empty()) return {};
  const size_t n = size_t(p.cs.K) * p.cs.L;
  return std::vector<double>(p.init.begin() + b * n, p.init.begin() + (b + 1) * n);
}

// Naive forward of the whole batch: v (B, K, d), c (B, K, L), s (B, K, d).
void naive_batch(const Problem& p, std::vector<double>& v, std::vector<double>& c,
                 std::vector<double>& s) {
  const Case& cs = p.cs;
  v.assign(size_t(cs.B) * cs.K * cs.d, 0);
  c.assign(size_t(cs.B) * cs.K * cs.L, 0);
  s.assign(size_t(cs.B) * cs.K * cs.d, 0);
  for (int b = 0; b < cs.B; ++b) {
    const auto ur = dense_row(p, p.u, b);
    const NaiveOut o = naive_forward(cs.K, cs.L, cs.d, cs.iters, cs.seq_axis, cs.seq_all, ur,
                                     ur, row_mask(p, b), row_init(p, b));
    std::copy(o.v.begin(), o.v.end(), v.begin() + size_t(b) * cs.K * cs.d);
    std::copy(o.c.begin(), o.c.end(), c.begin() + size_t(b) * cs.K * cs.L);
    std::copy(o.s.begin(), o.s.end(), s.begin() + size_t(b) * cs.K * cs.d);
  }
}

// Gradient of sum(v * grad_v) w.r.t. u (in u's layout) by central finite differences of the naive
// forward, in double. With detach only u_last moves.
std::vector<double> naive_grad_fd(const Problem& p) {
  const Case& cs = p.cs;
  std::vector<double> g(p.u.size(), 0.0);
  const double h = 1e-6;
  for (int b = 0; b < cs.B; ++b) {
    const auto ur = dense_row(p, p.u, b);
    const auto m = row_mask(p, b);
    const auto in = row_init(p, b);
    const double* gv = p.grad_v.data() + size_t(b) * cs.K * cs.d;
    auto objective = [&](const std::vector<double>& u_route, const std::vector<double>& u_last) {
      const NaiveOut o = naive_forward(cs.K, cs.L, cs.d, cs.iters, cs.seq_axis, cs.seq_all,
                                       u_route, u_last, m, in);
      double acc = 0;
      for (size_t i = 0; i < o.v.size(); ++i) acc += o.v[i] * gv[i];
      return acc;
    };
    // one element of u's storage maps to every k when shared: perturb all of them together.
    const int kn = cs.shared ? 1 : cs.K;
    for (int k = 0; k < kn; ++k)
      for (int l = 0; l < cs.L; ++l)
        for (int j = 0; j < cs.d; ++j) {
          auto up = ur, um = ur;
          for (int kk = 0; kk < cs.K; ++kk) {
            if (!cs.shared && kk != k) continue;
            up[(size_t(kk) * cs.L + l) * cs.d + j] += h;
            um[(size_t(kk) * cs.L + l) * cs.d + j] -= h;
          }
          const double fp = cs.detach ? objective(ur, up) : objective(up, up);
          const double fm = cs.detach ? objective(ur, um) : objective(um, um);
          g[p.uidx(b, k, l, j)] = (fp - fm) / (2 * h);
        }
  }
  return g;
}

// The kernel over the batch in element type T.
template <class T>
struct KernelOut {
  std::vector<double> v, c, s, grad_u;
};

template <class T>
KernelOut<T> run_kernel(const Problem& p) {
  using A = rc::acc_t<T>;
  const Case& cs = p.cs;
  const int B = cs.B, K = cs.K, L = cs.L, d = cs.d;
  rc::Dims D;
  D.K = K; D.L = L; D.d = d; D.iters = cs.iters; D.seq_axis = cs.seq_axis; D.shared = cs.shared;
  D.seq_all = cs.seq_all;

  std::vector<T> u(p.u.size());
  for (size_t i = 0; i < u.size(); ++i) u[i] = static_cast<T>(static_cast<A>(p.u[i]));
  std::vector<T> gv(p.grad_v.size());
  for (size_t i = 0; i < gv.size(); ++i) gv[i] = static_cast<T>(static_cast<A>(p.grad_v[i]));
  std::vector<A> init(p.init.size());
  for (size_t i = 0; i < init.size(); ++i) init[i] = static_cast<A>(p.init[i]);
  std::unique_ptr<bool[]> mask(new bool[p.mask.size()]);
  for (size_t i = 0; i < p.mask.size(); ++i) mask[i] = p.mask[i] != 0;

  std::vector<T> v(size_t(B) * K * d);
  std::vector<A> c(size_t(B) * K * L, A(-7)), s(size_t(B) * K * d, A(-7));
  const T poison = static_cast<T>(A(12345));
  std::vector<T> gu(u.size(), poison);  // every element must be written
  std::vector<A> ws(std::max(rc::fwd_scratch_elems<T>(D),
                             rc::bwd_scratch_elems<T>(D, cs.detach)), A(std::nan("")));
  std::vector<int32_t> idx(rc::idx_elems(D));

  const int64_t o_sb = cs.shared ? int64_t(L) * d : int64_t(K) * d;
  const int64_t o_sk = cs.shared ? 0 : d;
  const int64_t o_sl = cs.shared ? d : int64_t(B) * K * d;
  for (int b = 0; b < B; ++b) {
    const A* ib = init.empty() ? nullptr : init.data() + size_t(b) * K * L;
    rc::routing_fwd_row<T>(D, u.data() + b * p.sUb, p.sUk, p.sUl, mask.get() + size_t(b) * L, ib,
                           L, v.data() + size_t(b) * K * d, c.data() + size_t(b) * K * L,
                           s.data() + size_t(b) * K * d, ws.data(), idx.data());
  }
  for (int b = 0; b < B; ++b) {
    if (cs.detach) {
      rc::routing_bwd_detached_row<T>(D, gv.data() + size_t(b) * K * d, mask.get() + size_t(b) * L,
                                      c.data() + size_t(b) * K * L, s.data() + size_t(b) * K * d,
                                      gu.data() + b * o_sb, o_sk, o_sl, ws.data());
    } else {
      const A* ib = init.empty() ? nullptr : init.data() + size_t(b) * K * L;
      rc::routing_bwd_full_row<T>(D, gv.data() + size_t(b) * K * d, u.data() + b * p.sUb, p.sUk,
                                  p.sUl, mask.get() + size_t(b) * L, ib, L, gu.data() + b * o_sb,
                                  o_sk, o_sl, ws.data(), idx.data());
    }
  }
  KernelOut<T> out;
  for (auto& x : v) out.v.push_back(double(static_cast<A>(x)));
  for (auto& x : c) out.c.push_back(double(x));
  for (auto& x : s) out.s.push_back(double(x));
  for (auto& x : gu) out.grad_u.push_back(double(static_cast<A>(x)));
  return out;
}

void check_close(const std::string& what, const std::vector<double>& got,
                 const std::vector<double>& want, double atol, double rtol) {
  ++g_checks;
  if (got.size() != want.size()) {
    std::printf("FAIL %s: size %zu vs %zu\n", what.c_str(), got.size(), want.size());
    ++g_failures;
    return;
  }
  double worst = 0, worst_excess = -1;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    const double excess = err - (atol + rtol * std::fabs(want[i]));
    if (!(excess <= 0) && (excess > worst_excess || std::isnan(err))) {
      worst_excess = std::isnan(err) ? 1e300 : excess;
      at = i;
    }
    if (err > worst || std::isnan(err)) worst = err;
  }
  if (worst_excess > 0) {
    ++g_failures;
    std::printf("FAIL %s: max err %.3e, worst at %zu: got %.9g want %.9g (atol %.1e rtol %.1e)\n",
                what.c_str(), worst, at, got[at], want[at], atol, rtol);
  }
}

// Padded positions of grad_u and every output of an all-padded row must be exactly zero (grad_u
// at padded positions is not, by definition, for seq_all without detach: padded logits count).
template <class T>
void check_padding(const Problem& p, const KernelOut<T>& k, const std::string& tag) {
  ++g_checks;
  const Case& cs = p.cs;
  bool ok = true;
  for (int b = 0; b < cs.B && ok; ++b)
    for (int l = 0; l < cs.L && ok; ++l) {
      const bool real = p.mask[size_t(b) * cs.L + l] != 0;
      for (int k2 = 0; k2 < (cs.shared ? 1 : cs.K); ++k2)
        for (int j = 0; j < cs.d; ++j) {
          if (!real && k.grad_u[p.uidx(b, k2, l, j)] != 0.0 && (cs.detach || !cs.seq_all))
            ok = false;
          if (!real && k.c[(size_t(b) * cs.K + k2) * cs.L + l] != 0.0) ok = false;
        }
    }
  for (int b = 0; b < cs.B; ++b) {
    bool any = false;
    for (int l = 0; l < cs.L; ++l) any |= p.mask[size_t(b) * cs.L + l] != 0;
    if (any) continue;
    for (int i = 0; i < cs.K * cs.d; ++i)
      if (k.v[size_t(b) * cs.K * cs.d + i] != 0.0 || k.s[size_t(b) * cs.K * cs.d + i] != 0.0)
        ok = false;
  }
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s [%s]: padded positions / all-padded row not exactly zero\n",
                p.cs.name().c_str(), tag.c_str());
  }
}

void run_case(const Case& cs, std::mt19937& rng) {
  const Problem p = make_problem(cs, rng);
  std::vector<double> v, c, s;
  naive_batch(p, v, c, s);
  const std::vector<double> g = naive_grad_fd(p);
  const std::string n = cs.name();

  const KernelOut<double> kd = run_kernel<double>(p);
  check_close(n + " [double] v", kd.v, v, 1e-12, 1e-10);
  check_close(n + " [double] c_last", kd.c, c, 1e-12, 1e-10);
  check_close(n + " [double] s_last", kd.s, s, 1e-12, 1e-10);
  check_close(n + " [double] grad_u vs finite differences", kd.grad_u, g, 1e-6, 1e-6);
  check_padding(p, kd, "double");

  const KernelOut<float> kf = run_kernel<float>(p);
  check_close(n + " [float] v", kf.v, v, 2e-5, 1e-4);
  check_close(n + " [float] c_last", kf.c, c, 2e-5, 1e-4);
  check_close(n + " [float] s_last", kf.s, s, 2e-5, 1e-4);
  check_close(n + " [float] grad_u", kf.grad_u, g, 1e-4, 1e-3);
  check_close(n + " [float] grad_u vs double kernel", kf.grad_u, kd.grad_u, 1e-4, 1e-3);
  check_padding(p, kf, "float");

  const KernelOut<Boxed> kb = run_kernel<Boxed>(p);  // conversion path, same float arithmetic
  check_close(n + " [converted] v", kb.v, v, 2e-5, 1e-4);
  check_close(n + " [converted] grad_u", kb.grad_u, g, 1e-4, 1e-3);
  check_close(n + " [converted] grad_u vs float", kb.grad_u, kf.grad_u, 1e-6, 1e-5);
  check_padding(p, kb, "converted");
}

// squash backward against finite differences, including s = 0 (f'(n) must stay finite).
void test_squash() {
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int trial = 0; trial < 4; ++trial) {
    const int d = 5;
    std::vector<double> s(d), gv(d), gs(d), fd(d);
    for (int j = 0; j < d; ++j) {
      s[j] = trial == 0 ? 0.0 : nd(rng) * (trial == 1 ? 1e-3 : 1.0);
      gv[j] = nd(rng);
    }
    rc::squash_bwd(s.data(), gv.data(), gs.data(), d);
    const double h = 1e-7;
    for (int j = 0; j < d; ++j) {
      auto obj = [&](double delta) {
        std::vector<double> t = s, v(d);
        t[j] += delta;
        rc::squash_fwd(t.data(), v.data(), d);
        double acc = 0;
        for (int q = 0; q < d; ++q) acc += v[q] * gv[q];
        return acc;
      };
      fd[j] = trial == 0 ? gs[j] : (obj(h) - obj(-h)) / (2 * h);  // at 0 only finiteness
    }
    bool finite = true;
    for (double x : gs) finite &= std::isfinite(x);
    ++g_checks;
    if (!finite) {
      ++g_failures;
      std::printf("FAIL squash_bwd not finite (trial %d)\n", trial);
    }
    if (trial > 0) check_close("squash_bwd vs finite differences", gs, fd, 1e-5, 1e-5);
  }
}

// dot and the 4-term linear combinations on lengths around the lane width.
void test_primitives() {
  std::mt19937 rng(3);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int n : {0, 1, 3, 7, 8, 9, 16, 17, 31, 64, 100}) {
    std::vector<double> a(n), b(n);
    for (int j = 0; j < n; ++j) { a[j] = nd(rng); b[j] = nd(rng); }
    double want = 0;
    for (int j = 0; j < n; ++j) want += a[j] * b[j];
    check_close("dot n=" + std::to_string(n), {rc::dot(a.data(), b.data(), n)}, {want}, 1e-12,
                1e-12);
    for (int terms : {0, 1, 3, 4, 5, 9}) {
      std::vector<std::vector<double>> xs(terms, std::vector<double>(n));
      std::vector<double> coef(terms), y(n, 99.0), ref(n, 0.0);
      rc::LinAcc<double> acc(y.data(), n);
      for (int t = 0; t < terms; ++t) {
        coef[t] = nd(rng);
        for (int j = 0; j < n; ++j) {
          xs[t][j] = nd(rng);
          ref[j] += coef[t] * xs[t][j];
        }
        acc.add(coef[t], xs[t].data());
      }
      acc.finish();
      check_close("LinAcc n=" + std::to_string(n) + " terms=" + std::to_string(terms), y, ref,
                  1e-12, 1e-12);
    }
  }
}

}  // namespace

int main() {
  test_primitives();
  test_squash();
  std::mt19937 rng(12345);
  struct Shape { int B, K, L, d; double pad; };
  const Shape shapes[] = {
      {3, 4, 7, 16, 0.3},   // typical, with an all-padded and an all-real row
      {3, 1, 5, 8, 0.3},    // K = 1
      {3, 3, 1, 6, 0.3},    // L = 1
      {2, 3, 9, 19, 0.5},   // odd d (lane tail), many padded positions
      {1, 2, 4, 5, 0.0},    // B = 1, no padding
  };
  for (const Shape& sh : shapes)
    for (int iters : {1, 2, 3})
      for (bool shared : {true, false})
        for (int axis : {0, 1, 2})  // interest, sequence (real positions), sequence (all)
          for (bool detach : {true, false})
            for (bool with_init : {false, true}) {
              Case cs{sh.B, sh.K, sh.L, sh.d, iters, shared, axis > 0, detach, with_init, sh.pad,
                      axis == 2};
              run_case(cs, rng);
            }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
