// Tests of the CPU MoE kernels (gpu/cpu/moe.cpp) against their contracts in
// gpu/backend.h and the maths of BRIEF §1: group-limited routing (checked
// against a brute force over group sets), gates that ignore the bias, the
// permutation round trip, finite-difference gradients in F64, determinism
// across thread counts, and the auxiliary-loss-free bias rule
// (gpu/model/bias_update.h) balancing a skewed router.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <set>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/model/bias_update.h"
#include "tests/test_util.h"

namespace troupe {
namespace {

using troupe::testing::GradCheckError;
using troupe::testing::MakeIndex;
using troupe::testing::MakeTensor;
using troupe::testing::RandomTensor;
using troupe::testing::RandomValues;
using troupe::testing::ToVector;

// ---- helpers -----------------------------------------------------------------

// Sigmoid affinities (n, e): sigmoid(N(0,1) + skew[expert]).
std::vector<double> SigmoidScores(int64_t n, int64_t e, uint64_t seed, const std::vector<double>& skew = {}) {
  std::vector<double> z = RandomValues(static_cast<size_t>(n * e), seed);
  for (size_t i = 0; i < z.size(); ++i) {
    const double shift = skew.empty() ? 0.0 : skew[i % static_cast<size_t>(e)];
    z[i] = 1.0 / (1.0 + std::exp(-(z[i] + shift)));
  }
  return z;
}

Tensor Alloc(Backend& be, std::vector<int64_t> shape, DType dt, const char* name) {
  auto t = be.Alloc(std::move(shape), dt, name);
  EXPECT_TRUE(t.ok()) << t.status().message();
  return t.value();
}

struct Routed {
  std::vector<double> idx;   // (N, K) expert ids
  std::vector<double> gate;  // (N, K)
};

Routed Route(Backend& be, DType dt, const std::vector<double>& scores, const std::vector<double>& bias, int64_t n,
             int64_t e, const RoutingSpec& spec) {
  Tensor s = MakeTensor(be, {n, e}, dt, scores, "scores");
  Tensor b = MakeTensor(be, {e}, dt, bias, "bias");
  Tensor idx = Alloc(be, {n, spec.top_k}, DType::kI32, "topk_idx");
  Tensor gate = Alloc(be, {n, spec.top_k}, dt, "topk_gate");
  be.MoeRoute(idx, gate, s, b, spec);
  return {ToVector(be, idx), ToVector(be, gate)};
}

// The value a kernel sees for `v` in dtype `dt`.
double AsDtype(double v, DType dt) { return dt == DType::kF32 ? static_cast<double>(static_cast<float>(v)) : v; }

// Gates of a given selection from the scores alone, in double.
std::vector<double> ExpectedGates(const double* s, const std::vector<int>& sel, const RoutingSpec& spec) {
  double denom = 0.0;
  for (int e : sel) denom += s[e];
  std::vector<double> g;
  for (int e : sel) g.push_back(spec.normalize ? spec.scale * s[e] / denom : spec.scale * s[e]);
  return g;
}

// Brute-force router for one token: scores every group (top K/M of s + b,
// summed after a full sort), enumerates every set of M groups in lexicographic
// order keeping the first with the largest total (= ties to lower group
// indices), then fully sorts the allowed experts by (s + b desc, id asc).
// Returns the K expert ids ascending. sel = s + b already rounded to the dtype.
std::vector<int> BruteForceRoute(const std::vector<double>& sel, const RoutingSpec& spec) {
  const int E = static_cast<int>(sel.size()), G = spec.n_group, M = spec.topk_group, K = spec.top_k;
  const int size = E / G;
  const int per_group = std::min(size, std::max(1, K / M));
  std::vector<double> group_score(G);
  for (int g = 0; g < G; ++g) {
    std::vector<double> v(sel.begin() + g * size, sel.begin() + (g + 1) * size);
    std::sort(v.begin(), v.end(), std::greater<>());
    group_score[g] = std::accumulate(v.begin(), v.begin() + per_group, 0.0);
  }
  std::vector<int> best_set, cur;
  double best_total = -1e300;
  // Every M-subset of [0, G), lexicographic order.
  auto enumerate = [&](auto&& self, int start) -> void {
    if (static_cast<int>(cur.size()) == M) {
      double total = 0.0;
      for (int g : cur) total += group_score[g];
      if (total > best_total) best_total = total, best_set = cur;
      return;
    }
    for (int g = start; g < G; ++g) {
      cur.push_back(g);
      self(self, g + 1);
      cur.pop_back();
    }
  };
  enumerate(enumerate, 0);
  std::vector<int> allowed;
  for (int g : best_set) {
    for (int e = g * size; e < (g + 1) * size; ++e) allowed.push_back(e);
  }
  std::sort(allowed.begin(), allowed.end(), [&](int a, int b) { return sel[a] != sel[b] ? sel[a] > sel[b] : a < b; });
  std::vector<int> picked(allowed.begin(), allowed.begin() + K);
  std::sort(picked.begin(), picked.end());
  return picked;
}

std::vector<int> Row(const std::vector<double>& idx, int64_t n, int K) {
  std::vector<int> r;
  for (int k = 0; k < K; ++k) r.push_back(static_cast<int>(idx[n * K + k]));
  return r;
}

RoutingSpec Spec(int K, int G, int M, double scale = 1.0, bool normalize = true) {
  RoutingSpec s;
  s.top_k = K;
  s.n_group = G;
  s.topk_group = M;
  s.scale = scale;
  s.normalize = normalize;
  return s;
}

struct Combo {
  int E, G, M, K;
};
// Includes K/M = 0 (rounded up to 1), K/M > 1, M = G (no limit), G = 1, V3's shape.
const std::vector<Combo> kCombos = {{8, 1, 1, 2},  {16, 4, 2, 4},  {16, 8, 3, 2},  {32, 8, 3, 6},
                                    {12, 3, 1, 3}, {24, 4, 4, 5},  {64, 8, 4, 8},  {256, 8, 4, 8}};

class MoeOpsTest : public ::testing::Test {
 protected:
  CpuBackend be{2};
};

// ---- routing -------------------------------------------------------------------

// A hand example: the group limit changes the answer, and so does the bias.
TEST_F(MoeOpsTest, RouteHandExample) {
  // Groups of 2: g0 {0,1} sum 1.0, g1 {2,3} sum 1.5, g2 {4,5} 0.5, g3 {6,7} 0.95.
  // Unlimited top-2 would be {1, 6}; with M = 1 (K/M = 2) only g1 survives.
  const std::vector<double> s = {0.1, 0.9, 0.8, 0.7, 0.2, 0.3, 0.85, 0.1};
  const RoutingSpec spec = Spec(/*K=*/2, /*G=*/4, /*M=*/1, /*scale=*/2.5);
  Routed r = Route(be, DType::kF64, s, std::vector<double>(8, 0.0), 1, 8, spec);
  EXPECT_EQ(r.idx, (std::vector<double>{2, 3}));
  EXPECT_NEAR(r.gate[0], 2.5 * 0.8 / 1.5, 1e-15);
  EXPECT_NEAR(r.gate[1], 2.5 * 0.7 / 1.5, 1e-15);
  // Bias +1 on g2 lifts it to 2.5: experts {4, 5}, gates still from s alone.
  std::vector<double> b(8, 0.0);
  b[4] = b[5] = 1.0;
  r = Route(be, DType::kF64, s, b, 1, 8, spec);
  EXPECT_EQ(r.idx, (std::vector<double>{4, 5}));
  EXPECT_NEAR(r.gate[0], 2.5 * 0.2 / 0.5, 1e-15);
  EXPECT_NEAR(r.gate[1], 2.5 * 0.3 / 0.5, 1e-15);
  // Without normalisation a gate is scale * s.
  r = Route(be, DType::kF64, s, std::vector<double>(8, 0.0), 1, 8, Spec(2, 4, 1, 2.5, false));
  EXPECT_NEAR(r.gate[0], 2.5 * 0.8, 1e-15);
  // Ties: equal scores go to the lower expert id; equal groups to the lower group.
  r = Route(be, DType::kF64, std::vector<double>(8, 0.5), std::vector<double>(8, 0.0), 1, 8, Spec(3, 4, 2));
  EXPECT_EQ(r.idx, (std::vector<double>{0, 1, 2}));
}

// (a) At most M groups, exactly K distinct experts, ascending, in range.
TEST_F(MoeOpsTest, RouteUsesAtMostMGroupsAndKDistinctExperts) {
  const int64_t N = 400;
  uint64_t seed = 1;
  for (const Combo& c : kCombos) {
    for (DType dt : {DType::kF32, DType::kF64}) {
      SCOPED_TRACE(::testing::Message() << "E=" << c.E << " G=" << c.G << " M=" << c.M << " K=" << c.K
                                        << " dtype=" << DTypeName(dt));
      const std::vector<double> s = SigmoidScores(N, c.E, ++seed);
      const std::vector<double> b = RandomValues(c.E, ++seed, 0.2);
      const Routed r = Route(be, dt, s, b, N, c.E, Spec(c.K, c.G, c.M));
      const int size = c.E / c.G;
      int max_groups_used = 0;
      for (int64_t n = 0; n < N; ++n) {
        const std::vector<int> row = Row(r.idx, n, c.K);
        ASSERT_TRUE(std::is_sorted(row.begin(), row.end()));
        ASSERT_EQ(std::set<int>(row.begin(), row.end()).size(), static_cast<size_t>(c.K)) << "token " << n;
        ASSERT_GE(row.front(), 0);
        ASSERT_LT(row.back(), c.E);
        std::set<int> groups;
        for (int e : row) groups.insert(e / size);
        ASSERT_LE(static_cast<int>(groups.size()), c.M) << "token " << n;
        max_groups_used = std::max(max_groups_used, static_cast<int>(groups.size()));
      }
      // The limit binds: some token does use several groups when M > 1.
      if (c.M > 1 && c.K > 1) {
        EXPECT_GT(max_groups_used, 1);
      }
    }
  }
}

// (b) Against the brute force on random data, both dtypes, random bias.
TEST_F(MoeOpsTest, RouteMatchesBruteForce) {
  const int64_t N = 300;
  uint64_t seed = 100;
  for (const Combo& c : kCombos) {
    for (DType dt : {DType::kF32, DType::kF64}) {
      for (bool normalize : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "E=" << c.E << " G=" << c.G << " M=" << c.M << " K=" << c.K
                                          << " dtype=" << DTypeName(dt) << " normalize=" << normalize);
        const RoutingSpec spec = Spec(c.K, c.G, c.M, 2.5, normalize);
        const std::vector<double> s = SigmoidScores(N, c.E, ++seed);
        const std::vector<double> b = RandomValues(c.E, ++seed, 0.3);
        const Routed r = Route(be, dt, s, b, N, c.E, spec);
        int differs_from_plain_topk = 0;
        for (int64_t n = 0; n < N; ++n) {
          std::vector<double> sel(c.E), sn(c.E);
          for (int e = 0; e < c.E; ++e) {
            sn[e] = AsDtype(s[n * c.E + e], dt);
            sel[e] = AsDtype(sn[e] + AsDtype(b[e], dt), dt);
          }
          const std::vector<int> want = BruteForceRoute(sel, spec);
          ASSERT_EQ(Row(r.idx, n, c.K), want) << "token " << n;
          const std::vector<double> g = ExpectedGates(sn.data(), want, spec);
          const double tol = dt == DType::kF32 ? 1e-6 : 1e-14;  // one rounding to the dtype
          for (int k = 0; k < c.K; ++k) ASSERT_NEAR(r.gate[n * c.K + k], g[k], tol * std::abs(g[k]));
          // Count tokens where the group limit mattered, so the test exercises it.
          const std::vector<int> plain = BruteForceRoute(sel, Spec(c.K, 1, 1));
          differs_from_plain_topk += plain != want;
        }
        // When M >= K, K/M rounds up to one value per group and the best K
        // experts always lie in the best M groups: the limit binds only if M < min(G, K).
        if (c.M < c.G && c.M < c.K) {
          EXPECT_GT(differs_from_plain_topk, 0);
        }
      }
    }
  }
}

// (c) The bias changes the selection, never a gate value.
TEST_F(MoeOpsTest, BiasChangesSelectionButNotGates) {
  const int64_t N = 200;
  for (DType dt : {DType::kF32, DType::kF64}) {
    SCOPED_TRACE(DTypeName(dt));
    const int E = 16, G = 4, M = 2, K = 4;  // groups of 4, K/M = 2
    const RoutingSpec spec = Spec(K, G, M, 2.5);
    const std::vector<double> s = SigmoidScores(N, E, 7);
    const Routed base = Route(be, dt, s, std::vector<double>(E, 0.0), N, E, spec);

    // A bias that forces {1, 3} of group 0 and {13, 14} of group 3 for every token.
    std::vector<double> force(E, 0.0);
    const std::vector<int> forced = {1, 3, 13, 14};
    for (int e : forced) force[e] = 10.0;
    const Routed r = Route(be, dt, s, force, N, E, spec);
    int changed = 0;
    for (int64_t n = 0; n < N; ++n) {
      ASSERT_EQ(Row(r.idx, n, K), forced);
      changed += Row(base.idx, n, K) != forced;
      std::vector<double> sn(E);
      for (int e = 0; e < E; ++e) sn[e] = AsDtype(s[n * E + e], dt);
      const std::vector<double> g = ExpectedGates(sn.data(), forced, spec);
      const double tol = dt == DType::kF32 ? 1e-6 : 1e-14;
      for (int k = 0; k < K; ++k) ASSERT_NEAR(r.gate[n * K + k], g[k], tol * g[k]);
    }
    EXPECT_GT(changed, N * 9 / 10);

    // A constant bias shifts every (s + b) equally: no selection changes, and
    // the gates are bitwise those of the zero bias.
    const Routed same = Route(be, dt, s, std::vector<double>(E, 0.5), N, E, spec);
    EXPECT_EQ(same.idx, base.idx);
    EXPECT_EQ(same.gate, base.gate);  // exact double compare = bitwise for F32 values too

    // A small random bias: tokens whose selection did not change keep bitwise
    // gates; the others get the gates of their new selection.
    const std::vector<double> small = RandomValues(E, 8, 0.05);
    const Routed mixed = Route(be, dt, s, small, N, E, spec);
    int kept = 0, moved = 0;
    for (int64_t n = 0; n < N; ++n) {
      const std::vector<int> row = Row(mixed.idx, n, K);
      if (row == Row(base.idx, n, K)) {
        ++kept;
        for (int k = 0; k < K; ++k) ASSERT_EQ(mixed.gate[n * K + k], base.gate[n * K + k]) << "token " << n;
      } else {
        ++moved;
        std::vector<double> sn(E);
        for (int e = 0; e < E; ++e) sn[e] = AsDtype(s[n * E + e], dt);
        const std::vector<double> g = ExpectedGates(sn.data(), row, spec);
        for (int k = 0; k < K; ++k) ASSERT_NEAR(mixed.gate[n * K + k], g[k], 1e-6 * g[k]);
      }
    }
    EXPECT_GT(kept, 0);
    EXPECT_GT(moved, 0);
  }
}

// ---- gradients (F64 central differences) --------------------------------------

TEST_F(MoeOpsTest, RouteBackwardGradCheck) {
  const int64_t N = 12;
  const int E = 16;
  for (bool normalize : {true, false}) {
    SCOPED_TRACE(normalize ? "normalize" : "no normalize");
    const RoutingSpec spec = Spec(4, 4, 2, 2.5, normalize);
    Tensor s = MakeTensor(be, {N, E}, DType::kF64, SigmoidScores(N, E, 21), "scores");
    Tensor b = RandomTensor(be, {E}, DType::kF64, 22, 0.1);
    Tensor r = RandomTensor(be, {N, 4}, DType::kF64, 23);  // loss = sum gate * R
    Tensor idx = Alloc(be, {N, 4}, DType::kI32, "idx");
    Tensor gate = Alloc(be, {N, 4}, DType::kF64, "gate");
    be.MoeRoute(idx, gate, s, b, spec);
    const std::vector<double> idx0 = ToVector(be, idx);
    Tensor ds = Alloc(be, {N, E}, DType::kF64, "dscores");
    be.MoeRouteBackward(ds, r, s, idx, spec);
    auto loss = [&] {
      be.MoeRoute(idx, gate, s, b, spec);
      EXPECT_EQ(ToVector(be, idx), idx0) << "a perturbation changed the selection";
      const std::vector<double> g = ToVector(be, gate), rv = ToVector(be, r);
      double l = 0.0;
      for (size_t i = 0; i < g.size(); ++i) l += g[i] * rv[i];
      return l;
    };
    // eps 1e-6 keeps every perturbation inside the selection (checked in loss()).
    EXPECT_LT(GradCheckError(s, ds, loss, /*max_elements=*/N * E, /*eps=*/1e-6), 1e-6);
  }
}

// Shared setup of the permute / combine checks: N tokens routed to K of E experts.
struct Assignment {
  Tensor idx, offsets, slot;
};
Assignment RandomAssignment(Backend& be, int64_t N, int K, int E, uint64_t seed) {
  const std::vector<double> s = SigmoidScores(N, E, seed);
  Tensor st = MakeTensor(be, {N, E}, DType::kF64, s);
  Tensor b = MakeTensor(be, {E}, DType::kF64, std::vector<double>(E, 0.0));
  Assignment a{Alloc(be, {N, K}, DType::kI32, "idx"), Alloc(be, {E + 1}, DType::kI32, "offsets"),
               Alloc(be, {N, K}, DType::kI32, "slot")};
  Tensor gate = Alloc(be, {N, K}, DType::kF64, "gate");
  be.MoeRoute(a.idx, gate, st, b, Spec(K, 1, 1));
  return a;
}

double Dot(Backend& be, const Tensor& a, const Tensor& b) {
  const std::vector<double> x = ToVector(be, a), y = ToVector(be, b);
  double d = 0.0;
  for (size_t i = 0; i < x.size(); ++i) d += x[i] * y[i];
  return d;
}

TEST_F(MoeOpsTest, PermuteBackwardGradCheck) {
  const int64_t N = 10, D = 5;
  const int K = 3, E = 6;
  Assignment a = RandomAssignment(be, N, K, E, 31);
  Tensor x = RandomTensor(be, {N, D}, DType::kF64, 32);
  Tensor xs = Alloc(be, {N * K, D}, DType::kF64, "x_sorted");
  Tensor w = RandomTensor(be, {N * K, D}, DType::kF64, 33);  // loss = sum W * x_sorted
  be.MoePermute(xs, a.offsets, a.slot, x, a.idx, E);
  Tensor dx = Alloc(be, {N, D}, DType::kF64, "dx");
  be.MoePermuteBackward(dx, w, a.slot);
  auto loss = [&] {
    be.MoePermute(xs, a.offsets, a.slot, x, a.idx, E);
    return Dot(be, xs, w);
  };
  // The loss is linear in x: a large step has no truncation error and less roundoff.
  EXPECT_LT(GradCheckError(x, dx, loss, N * D, /*eps=*/1e-3), 1e-6);
}

TEST_F(MoeOpsTest, CombineBackwardGradCheck) {
  const int64_t N = 10, D = 5;
  const int K = 3, E = 6;
  Assignment a = RandomAssignment(be, N, K, E, 41);
  Tensor x = RandomTensor(be, {N, D}, DType::kF64, 42);
  Tensor xs = Alloc(be, {N * K, D}, DType::kF64, "x_sorted");
  be.MoePermute(xs, a.offsets, a.slot, x, a.idx, E);  // only the slots are used
  Tensor ys = RandomTensor(be, {N * K, D}, DType::kF64, 43);
  Tensor gate = RandomTensor(be, {N, K}, DType::kF64, 44);
  Tensor y0 = RandomTensor(be, {N, D}, DType::kF64, 45);  // y is accumulated into
  Tensor w = RandomTensor(be, {N, D}, DType::kF64, 46);   // loss = sum W * y
  Tensor y = Alloc(be, {N, D}, DType::kF64, "y");
  // dy_sorted and dgate are OVERWRITTEN: start them with garbage.
  Tensor dys = RandomTensor(be, {N * K, D}, DType::kF64, 47, 100.0);
  Tensor dgate = RandomTensor(be, {N, K}, DType::kF64, 48, 100.0);
  be.MoeCombineBackward(dys, dgate, w, ys, gate, a.slot);
  auto loss = [&] {
    be.Copy(y, y0);
    be.MoeCombine(y, ys, gate, a.slot);
    return Dot(be, y, w);
  };
  // Linear in each of y_sorted and gate: a large step only reduces roundoff.
  EXPECT_LT(GradCheckError(ys, dys, loss, N * K * D, /*eps=*/1e-3), 1e-6);
  EXPECT_LT(GradCheckError(gate, dgate, loss, N * K, /*eps=*/1e-3), 1e-6);
}

// Forward against the definition, then the gradient.
TEST_F(MoeOpsTest, BalanceLossMatchesFormulaAndGradCheck) {
  const int64_t T = 7, B = 3, N = T * B;
  const int E = 8, K = 2;
  const double alpha = 0.37, dloss = 1.7;
  const std::vector<double> sv = SigmoidScores(N, E, 51);
  Tensor s = MakeTensor(be, {N, E}, DType::kF64, sv, "scores");
  Tensor b = MakeTensor(be, {E}, DType::kF64, std::vector<double>(E, 0.0));
  Tensor idx = Alloc(be, {N, K}, DType::kI32, "idx");
  Tensor gate = Alloc(be, {N, K}, DType::kF64, "gate");
  be.MoeRoute(idx, gate, s, b, Spec(K, 2, 1));
  const std::vector<double> iv = ToVector(be, idx);
  Tensor l = RandomTensor(be, {B}, DType::kF64, 52);  // OVERWRITTEN
  be.MoeBalanceLoss(l, s, idx, static_cast<int>(T), alpha);
  const std::vector<double> lv = ToVector(be, l);
  for (int64_t q = 0; q < B; ++q) {
    std::vector<double> f(E, 0.0), p(E, 0.0);
    for (int64_t t = q * T; t < (q + 1) * T; ++t) {
      for (int k = 0; k < K; ++k) f[static_cast<int>(iv[t * K + k])] += static_cast<double>(E) / (K * T);
      double denom = 0.0;
      for (int j = 0; j < E; ++j) denom += sv[t * E + j];
      for (int i = 0; i < E; ++i) p[i] += sv[t * E + i] / denom / T;
    }
    double want = 0.0;
    for (int i = 0; i < E; ++i) want += f[i] * p[i];
    EXPECT_NEAR(lv[q], alpha * want, 1e-14) << "sequence " << q;
  }
  // Equal scores: P_i = 1/E and sum_i f_i = E, so the loss is alpha whatever the counts.
  Tensor flat = MakeTensor(be, {N, E}, DType::kF64, std::vector<double>(N * E, 0.3));
  be.MoeBalanceLoss(l, flat, idx, static_cast<int>(T), alpha);
  for (double v : ToVector(be, l)) EXPECT_NEAR(v, alpha, 1e-14);

  Tensor ds = Alloc(be, {N, E}, DType::kF64, "dscores");
  be.MoeBalanceLossBackward(ds, s, idx, static_cast<int>(T), alpha, dloss);
  auto loss = [&] {
    be.MoeBalanceLoss(l, s, idx, static_cast<int>(T), alpha);
    const std::vector<double> v = ToVector(be, l);
    return dloss * std::accumulate(v.begin(), v.end(), 0.0);
  };
  // Smooth in s (the selection is an input here); eps 1e-4 balances truncation
  // (~eps^2) against roundoff on entries where c_j - r_t is close to 0.
  EXPECT_LT(GradCheckError(s, ds, loss, N * E, /*eps=*/1e-4), 1e-6);
}

// Backward ops that are documented "+=" really add.
TEST_F(MoeOpsTest, BackwardsAccumulate) {
  const int64_t N = 8, D = 4, T = 4;
  const int K = 2, E = 6;
  Assignment a = RandomAssignment(be, N, K, E, 61);
  Tensor s = MakeTensor(be, {N, E}, DType::kF64, SigmoidScores(N, E, 62));
  Tensor dgate = RandomTensor(be, {N, K}, DType::kF64, 63);
  Tensor dxs = RandomTensor(be, {N * K, D}, DType::kF64, 64);
  Tensor x = RandomTensor(be, {N, D}, DType::kF64, 65);
  Tensor xs = Alloc(be, {N * K, D}, DType::kF64, "xs");
  be.MoePermute(xs, a.offsets, a.slot, x, a.idx, E);
  const RoutingSpec spec = Spec(K, 1, 1, 2.5);
  auto twice_equals_base_plus_2g = [&](const char* what, auto&& backward, std::vector<int64_t> shape) {
    Tensor g = Alloc(be, shape, DType::kF64, "g");
    backward(g);
    Tensor acc = RandomTensor(be, shape, DType::kF64, 66);
    const std::vector<double> base = ToVector(be, acc);
    backward(acc);
    backward(acc);
    const std::vector<double> gv = ToVector(be, g), av = ToVector(be, acc);
    bool any_nonzero = false;
    for (size_t i = 0; i < gv.size(); ++i) {
      EXPECT_NEAR(av[i], base[i] + 2 * gv[i], 1e-12) << what << " element " << i;
      any_nonzero |= gv[i] != 0.0;
    }
    EXPECT_TRUE(any_nonzero) << what;
  };
  twice_equals_base_plus_2g("MoeRouteBackward", [&](Tensor& g) { be.MoeRouteBackward(g, dgate, s, a.idx, spec); },
                            {N, E});
  twice_equals_base_plus_2g("MoePermuteBackward", [&](Tensor& g) { be.MoePermuteBackward(g, dxs, a.slot); }, {N, D});
  twice_equals_base_plus_2g(
      "MoeBalanceLossBackward",
      [&](Tensor& g) { be.MoeBalanceLossBackward(g, s, a.idx, static_cast<int>(T), 0.1, 1.0); }, {N, E});
}

// ---- permutation ---------------------------------------------------------------

// (e) Identity experts, gates 1: y = K x. Offsets are prefix sums of the
// loads; the sort is a stable permutation.
TEST_F(MoeOpsTest, PermuteCombineRoundTripAndOffsets) {
  for (DType dt : {DType::kF32, DType::kF64}) {
    SCOPED_TRACE(DTypeName(dt));
    const int64_t N = 97, D = 6;
    const int K = 4, E = 16;
    const std::vector<double> sv = SigmoidScores(N, E, 71);
    Tensor s = MakeTensor(be, {N, E}, dt, sv);
    Tensor b = MakeTensor(be, {E}, dt, RandomValues(E, 72, 0.3));
    Tensor idx = Alloc(be, {N, K}, DType::kI32, "idx");
    Tensor gate = Alloc(be, {N, K}, dt, "gate");
    be.MoeRoute(idx, gate, s, b, Spec(K, 4, 2));
    Tensor x = RandomTensor(be, {N, D}, dt, 73);
    Tensor xs = Alloc(be, {N * K, D}, dt, "x_sorted");
    Tensor offsets = Alloc(be, {E + 1}, DType::kI32, "offsets");
    Tensor slot = Alloc(be, {N, K}, DType::kI32, "slot");
    be.MoePermute(xs, offsets, slot, x, idx, E);
    Tensor ones = MakeTensor(be, {N, K}, dt, std::vector<double>(N * K, 1.0));
    Tensor y = Alloc(be, {N, D}, dt, "y");
    be.MoeCombine(y, xs, ones, slot);  // identity experts: y_sorted = x_sorted
    const std::vector<double> xv = ToVector(be, x), yv = ToVector(be, y);
    for (size_t i = 0; i < xv.size(); ++i) ASSERT_EQ(yv[i], AsDtype(K * xv[i], dt)) << i;  // K=4: exact

    Tensor counts = RandomTensor(be, {E}, DType::kI32, 74);  // OVERWRITTEN
    be.MoeExpertLoad(counts, idx, E);
    const std::vector<double> cv = ToVector(be, counts), ov = ToVector(be, offsets);
    const std::vector<double> iv = ToVector(be, idx), sl = ToVector(be, slot), xsv = ToVector(be, xs);
    ASSERT_EQ(ov[0], 0);
    for (int e = 0; e < E; ++e) ASSERT_EQ(ov[e + 1], ov[e] + cv[e]) << "expert " << e;
    ASSERT_EQ(ov[E], N * K);
    // Direct recount of the loads.
    std::vector<double> want(E, 0.0);
    for (double e : iv) want[static_cast<int>(e)] += 1;
    EXPECT_EQ(cv, want);
    // slot is a permutation; each assignment lands in its expert's range, in
    // (token, k) order, carrying its token's row.
    std::vector<int> seen(N * K, 0);
    std::vector<double> last_token(E, -1);
    std::vector<std::pair<double, int64_t>> by_slot(N * K);
    for (int64_t n = 0; n < N; ++n) {
      for (int k = 0; k < K; ++k) {
        const int64_t r = static_cast<int64_t>(sl[n * K + k]);
        const int e = static_cast<int>(iv[n * K + k]);
        ASSERT_GE(r, ov[e]);
        ASSERT_LT(r, ov[e + 1]);
        ++seen[r];
        for (int64_t c = 0; c < D; ++c) ASSERT_EQ(xsv[r * D + c], xv[n * D + c]);
        by_slot[r] = {static_cast<double>(n), e};
      }
    }
    for (int v : seen) ASSERT_EQ(v, 1);
    for (int64_t r = 1; r < N * K; ++r) {
      if (by_slot[r].second == by_slot[r - 1].second) {
        ASSERT_LT(by_slot[r - 1].first, by_slot[r].first);
      }
    }
  }
}

// Stability with a repeated expert in a row (outside the router's contract,
// but the sort is defined for it): order is token, then k.
TEST_F(MoeOpsTest, PermuteIsStableByTokenThenK) {
  const int64_t N = 3, D = 1, K = 2;
  const int E = 3;
  Tensor idx = MakeIndex(be, {N, K}, {2, 0, 0, 0, 2, 2});
  Tensor x = MakeTensor(be, {N, D}, DType::kF64, {10, 20, 30});
  Tensor xs = Alloc(be, {N * K, D}, DType::kF64, "xs");
  Tensor offsets = Alloc(be, {E + 1}, DType::kI32, "offsets");
  Tensor slot = Alloc(be, {N, K}, DType::kI32, "slot");
  be.MoePermute(xs, offsets, slot, x, idx, E);
  EXPECT_EQ(ToVector(be, offsets), (std::vector<double>{0, 3, 3, 6}));
  // Expert 0: (0,1) (1,0) (1,1); expert 2: (0,0) (2,0) (2,1).
  EXPECT_EQ(ToVector(be, slot), (std::vector<double>{3, 0, 1, 2, 4, 5}));
  EXPECT_EQ(ToVector(be, xs), (std::vector<double>{10, 20, 20, 10, 30, 30}));
}

// ---- determinism ---------------------------------------------------------------

// (f) Every op, F32, 1 thread vs 3 threads: bitwise equal outputs.
TEST_F(MoeOpsTest, DeterministicAcrossThreadCounts) {
  const int64_t N = 600, D = 24, T = 50;
  const int E = 64, G = 8, M = 4, K = 8;
  const RoutingSpec spec = Spec(K, G, M, 2.5);
  const std::vector<double> sv = SigmoidScores(N, E, 81);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Tensor s = MakeTensor(be, {N, E}, DType::kF32, sv);
    Tensor b = RandomTensor(be, {E}, DType::kF32, 82, 0.1);
    Tensor idx = Alloc(be, {N, K}, DType::kI32, "idx");
    Tensor gate = Alloc(be, {N, K}, DType::kF32, "gate");
    be.MoeRoute(idx, gate, s, b, spec);
    Tensor ds = RandomTensor(be, {N, E}, DType::kF32, 83);
    be.MoeRouteBackward(ds, RandomTensor(be, {N, K}, DType::kF32, 84), s, idx, spec);
    be.MoeBalanceLossBackward(ds, s, idx, static_cast<int>(T), 1e-2, 3.0);
    Tensor loss = Alloc(be, {N / T}, DType::kF32, "loss");
    be.MoeBalanceLoss(loss, s, idx, static_cast<int>(T), 1e-2);
    Tensor x = RandomTensor(be, {N, D}, DType::kF32, 85);
    Tensor xs = Alloc(be, {N * K, D}, DType::kF32, "xs");
    Tensor offsets = Alloc(be, {E + 1}, DType::kI32, "offsets");
    Tensor slot = Alloc(be, {N, K}, DType::kI32, "slot");
    be.MoePermute(xs, offsets, slot, x, idx, E);
    Tensor dx = RandomTensor(be, {N, D}, DType::kF32, 86);
    be.MoePermuteBackward(dx, RandomTensor(be, {N * K, D}, DType::kF32, 87), slot);
    Tensor y = RandomTensor(be, {N, D}, DType::kF32, 88);
    be.MoeCombine(y, xs, gate, slot);
    Tensor dys = Alloc(be, {N * K, D}, DType::kF32, "dys");
    Tensor dgate = Alloc(be, {N, K}, DType::kF32, "dgate");
    be.MoeCombineBackward(dys, dgate, RandomTensor(be, {N, D}, DType::kF32, 89), xs, gate, slot);
    Tensor counts = Alloc(be, {E}, DType::kI32, "counts");
    be.MoeExpertLoad(counts, idx, E);
    std::vector<std::vector<unsigned char>> bytes;
    for (const Tensor* t : {&idx, &gate, &ds, &loss, &xs, &offsets, &slot, &dx, &y, &dys, &dgate, &counts}) {
      std::vector<unsigned char> v(t->bytes());
      be.CopyToHost(v.data(), *t);
      bytes.push_back(std::move(v));
    }
    return bytes;
  };
  const auto one = run(1);
  const auto three = run(3);
  omp_set_num_threads(be.threads());
  ASSERT_EQ(one.size(), three.size());
  for (size_t i = 0; i < one.size(); ++i) EXPECT_EQ(one[i], three[i]) << "output " << i;
}

// ---- auxiliary-loss-free balancing -----------------------------------------------

TEST(RoutingBiasRule, SignOfDistanceToMean) {
  std::vector<float> bias = {0.f, 0.f, 0.5f, -0.25f};
  UpdateRoutingBias(bias, {10, 2, 4, 4}, 0.125);  // mean 5
  EXPECT_EQ(bias, (std::vector<float>{-0.125f, 0.125f, 0.625f, -0.125f}));
  std::vector<float> flat = {1.f, 2.f, 3.f};
  UpdateRoutingBias(flat, {7, 7, 7}, 0.5);  // at the mean: sign(0) = 0
  EXPECT_EQ(flat, (std::vector<float>{1.f, 2.f, 3.f}));
  std::vector<float> thirds = {0.f, 0.f, 0.f};
  UpdateRoutingBias(thirds, {1, 1, 2}, 1.0);  // mean 4/3: no rounding can hide the sign
  EXPECT_EQ(thirds, (std::vector<float>{1.f, 1.f, -1.f}));
}

// Route a fixed, skewed batch again and again, feeding the loads back through
// the sign rule: the bias alone must flatten the load.
TEST_F(MoeOpsTest, BiasRuleBalancesSkewedRouter) {
  const int64_t N = 1024;
  const int E = 16, G = 4, M = 2, K = 4;
  const RoutingSpec spec = Spec(K, G, M, 2.5);
  std::vector<double> skew(E, 0.0);
  skew[0] = skew[1] = 2.0;  // two hot experts in group 0 and one in group 2
  skew[9] = 1.5;
  Tensor s = MakeTensor(be, {N, E}, DType::kF32, SigmoidScores(N, E, 91, skew));
  Tensor b = Alloc(be, {E}, DType::kF32, "bias");
  Tensor idx = Alloc(be, {N, K}, DType::kI32, "idx");
  Tensor gate = Alloc(be, {N, K}, DType::kF32, "gate");
  Tensor counts = Alloc(be, {E}, DType::kI32, "counts");
  std::vector<float> bias(E, 0.0f);
  const double mean = static_cast<double>(N * K) / E;
  auto route_and_ratio = [&](std::vector<int64_t>& load) {
    be.CopyFromHost(b, bias.data());
    be.MoeRoute(idx, gate, s, b, spec);
    be.MoeExpertLoad(counts, idx, E);
    const std::vector<double> cv = ToVector(be, counts);
    load.assign(cv.begin(), cv.end());
    return static_cast<double>(*std::max_element(load.begin(), load.end())) / mean;
  };
  std::vector<int64_t> load;
  const double initial = route_and_ratio(load);
  EXPECT_GT(initial, 2.0);
  double worst_late = 0.0;
  const int iterations = 400, tail = 50;
  for (int it = 0; it < iterations; ++it) {
    UpdateRoutingBias(bias, load, /*gamma=*/0.002);
    const double ratio = route_and_ratio(load);
    if (it >= iterations - tail) worst_late = std::max(worst_late, ratio);
  }
  // Not just one lucky step: the last `tail` steps all stay balanced.
  EXPECT_LT(worst_late, 1.3) << "initial max/mean " << initial;
  // The hot experts ended with the lowest biases.
  EXPECT_LT(bias[0], 0.0f);
  EXPECT_LT(bias[1], 0.0f);
}

}  // namespace
}  // namespace troupe
