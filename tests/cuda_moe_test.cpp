// The CUDA MoE kernels (gpu/cuda/moe.cu) against the CPU reference
// (gpu/cpu/moe.cpp), in F32, op by op, over several routing shapes:
// V3's (E=256, K=8, G=8, M=4), small odd ones, no group limit, K/M < 1, no
// normalisation, many ties, and N*K = 256k assignments for the sort.
//   exact:  topk_idx, offsets, slot, expert loads, x_sorted (a pure copy);
//   1e-6:   gates (same F32 selection, same double arithmetic: in practice 0);
//   1e-5:   every other float (sums in another, still fixed, order).
// Each op gets the same inputs on both backends (the CPU's routing feeds the
// later ops), so one broken op does not hide behind another. Skipped when the
// machine has no CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "tests/test_util.h"

#ifdef TROUPE_HAVE_CUDA
#include "gpu/cuda/cuda_backend.h"
#endif

namespace troupe {
namespace {

using troupe::testing::MakeIndex;
using troupe::testing::MakeTensor;
using troupe::testing::RandomValues;
using troupe::testing::ToVector;

#ifdef TROUPE_HAVE_CUDA

struct Case {
  int64_t N;       // tokens
  int E, K, G, M;  // experts, top-k, groups, groups kept
  int64_t D;       // row width of x / y (D % 4 != 0 exercises the scalar path)
  int seq_len;     // balance-loss sequence length (divides N)
  double scale;    // routed scaling factor
  bool normalize;  // normalised gates
  bool ties;       // scores on a coarse grid and zero bias: many exact ties
  std::string name;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.name << " (N=" << c.N << " E=" << c.E << " K=" << c.K << " G=" << c.G << " M=" << c.M << " D=" << c.D
            << " T=" << c.seq_len << ")";
}

const std::vector<Case> kCases = {
    {512, 256, 8, 8, 4, 64, 128, 2.5, true, false, "v3_like"},
    {7, 6, 2, 3, 2, 5, 7, 1.0, true, false, "tiny_odd"},
    {33, 16, 4, 1, 1, 12, 11, 1.0, true, false, "one_group"},
    {100, 64, 6, 16, 3, 33, 25, 1.5, true, false, "sixteen_groups"},
    {64, 48, 2, 4, 3, 8, 64, 1.0, true, false, "k_below_m"},
    {257, 32, 1, 4, 4, 8, 257, 2.0, false, false, "no_limit_unnormalised"},
    {300, 64, 8, 8, 4, 20, 100, 2.5, true, true, "ties"},
    {200, 40, 3, 5, 2, 17, 40, 1.0, true, false, "five_groups"},
    {32768, 256, 8, 8, 4, 16, 4096, 2.5, true, false, "256k_assignments"},
};

// Sigmoid affinities in (0, 1); on a grid of 1/8 when `ties`.
std::vector<double> Scores(const Case& c, uint64_t seed) {
  std::vector<double> z = RandomValues(static_cast<size_t>(c.N * c.E), seed);
  for (double& v : z) {
    v = 1.0 / (1.0 + std::exp(-v));
    if (c.ties) v = std::round(v * 8.0) / 8.0;
  }
  return z;
}

// Worst |a - b| / max(|a|, |b|, floor), floor = 0.1 * the largest |b|: a sum of
// K rounded F32 terms carries an absolute error of a few ulps of its terms, not
// of its result, so an entry that cancels towards zero is judged against the
// tensor's scale. A wrong row or gate still errs by O(1). Also reports where
// the worst one is.
struct Diff {
  double worst = 0.0;
  size_t at = 0;
  double a = 0.0, b = 0.0;
};

Diff RelDiff(const std::vector<double>& a, const std::vector<double>& b) {
  Diff d;
  double scale = 0.0;
  for (double v : b) scale = std::max(scale, std::abs(v));
  const double floor = std::max(0.1 * scale, 1e-30);
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double err = std::abs(a[i] - b[i]) / std::max({std::abs(a[i]), std::abs(b[i]), floor});
    if (!(err <= d.worst)) d = {err, i, a[i], b[i]};  // NaN counts as worst
  }
  return d;
}

// Expects the GPU vector to equal the CPU one within `tol` (relative).
void ExpectClose(const char* what, const std::vector<double>& gpu, const std::vector<double>& cpu, double tol,
                 int64_t row_len) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  const Diff d = RelDiff(gpu, cpu);
  EXPECT_LE(d.worst, tol) << what << ": worst relative error " << d.worst << " at flat " << d.at << " (row "
                          << d.at / row_len << ", col " << d.at % row_len << "): gpu " << d.a << " cpu " << d.b;
}

// Expects exact equality; reports the first mismatch and how many there are.
void ExpectExact(const char* what, const std::vector<double>& gpu, const std::vector<double>& cpu, int64_t row_len) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < gpu.size(); ++i) {
    if (gpu[i] != cpu[i]) {
      if (bad++ == 0) first = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << gpu.size() << " differ; first at flat " << first << " (row "
                     << first / row_len << ", col " << first % row_len << "): gpu " << gpu[first] << " cpu "
                     << cpu[first];
}

std::vector<int32_t> AsInt(const std::vector<double>& v) { return std::vector<int32_t>(v.begin(), v.end()); }

class CudaMoeTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    auto be = CudaBackend::Create(0, MatmulPrecision::kFp32);
    if (!be.ok()) GTEST_SKIP() << "no CUDA device: " << be.status().message();
    gpu_ = std::move(be.value());
  }

  // Fails the test with the backend's sticky error, naming the step.
  void ExpectHealthy(const char* step) {
    const Status st = gpu_->Synchronize();
    ASSERT_TRUE(st.ok()) << "after " << step << ": " << st.message();
  }

  Tensor Alloc(Backend& be, std::vector<int64_t> shape, DType dt, const char* name) {
    auto t = be.Alloc(std::move(shape), dt, name);
    EXPECT_TRUE(t.ok()) << t.status().message();
    return t.value();
  }

  Tensor F32(Backend& be, std::vector<int64_t> shape, const std::vector<double>& v, const char* name) {
    return MakeTensor(be, std::move(shape), DType::kF32, v, name);
  }

  RoutingSpec Spec(const Case& c) const {
    RoutingSpec s;
    s.top_k = c.K;
    s.n_group = c.G;
    s.topk_group = c.M;
    s.scale = c.scale;
    s.normalize = c.normalize;
    return s;
  }

  CpuBackend cpu_{4};
  std::unique_ptr<CudaBackend> gpu_;
};

TEST_P(CudaMoeTest, MatchesCpuReference) {
  const Case c = GetParam();
  SCOPED_TRACE(::testing::Message() << c);
  const int64_t N = c.N, E = c.E, K = c.K, D = c.D, NK = c.N * c.K, B = c.N / c.seq_len;
  ASSERT_EQ(N % c.seq_len, 0) << "bad test case";
  const RoutingSpec spec = Spec(c);
  uint64_t seed = 1000 + static_cast<uint64_t>(N * 131 + E * 7 + K);

  const std::vector<double> scores = Scores(c, ++seed);
  std::vector<double> bias = RandomValues(static_cast<size_t>(E), ++seed, 0.05);
  if (c.ties) std::fill(bias.begin(), bias.end(), 0.0);

  // ---- MoeRoute: ids exact, gates 1e-6, at most M groups per token --------------
  std::vector<double> idx_cpu, gate_cpu;
  {
    SCOPED_TRACE("MoeRoute");
    Tensor s_c = F32(cpu_, {N, E}, scores, "scores"), b_c = F32(cpu_, {E}, bias, "bias");
    Tensor s_g = F32(*gpu_, {N, E}, scores, "scores"), b_g = F32(*gpu_, {E}, bias, "bias");
    Tensor i_c = Alloc(cpu_, {N, K}, DType::kI32, "topk_idx"), g_c = Alloc(cpu_, {N, K}, DType::kF32, "topk_gate");
    Tensor i_g = Alloc(*gpu_, {N, K}, DType::kI32, "topk_idx"), g_g = Alloc(*gpu_, {N, K}, DType::kF32, "topk_gate");
    cpu_.MoeRoute(i_c, g_c, s_c, b_c, spec);
    gpu_->MoeRoute(i_g, g_g, s_g, b_g, spec);
    ExpectHealthy("MoeRoute");
    idx_cpu = ToVector(cpu_, i_c);
    gate_cpu = ToVector(cpu_, g_c);
    const std::vector<double> idx_gpu = ToVector(*gpu_, i_g);
    ExpectExact("topk_idx", idx_gpu, idx_cpu, K);
    ExpectClose("topk_gate", ToVector(*gpu_, g_g), gate_cpu, 1e-6, K);

    const int group_size = c.E / c.G;
    int64_t bad_tokens = 0, first_bad = -1;
    for (int64_t n = 0; n < N; ++n) {
      std::set<int> groups;
      bool ok = true;
      for (int64_t k = 0; k < K; ++k) {
        const int e = static_cast<int>(idx_gpu[n * K + k]);
        ok = ok && e >= 0 && e < c.E && (k == 0 || e > idx_gpu[n * K + k - 1]);
        groups.insert(e / group_size);
      }
      ok = ok && static_cast<int>(groups.size()) <= c.M;
      if (!ok && bad_tokens++ == 0) first_bad = n;
    }
    EXPECT_EQ(bad_tokens, 0) << "tokens with ids out of range, not strictly ascending, or over M=" << c.M
                             << " groups; first token " << first_bad;
  }
  const std::vector<int32_t> idx_host = AsInt(idx_cpu);

  // ---- MoeRouteBackward: dscores += ..., 1e-5 ----------------------------------------
  {
    SCOPED_TRACE("MoeRouteBackward");
    const std::vector<double> dgate = RandomValues(static_cast<size_t>(NK), ++seed);
    const std::vector<double> ds0 = RandomValues(static_cast<size_t>(N * E), ++seed, 0.1);
    Tensor dg_c = F32(cpu_, {N, K}, dgate, "dgate"), dg_g = F32(*gpu_, {N, K}, dgate, "dgate");
    Tensor s_c = F32(cpu_, {N, E}, scores, "scores"), s_g = F32(*gpu_, {N, E}, scores, "scores");
    Tensor i_c = MakeIndex(cpu_, {N, K}, idx_host), i_g = MakeIndex(*gpu_, {N, K}, idx_host);
    Tensor ds_c = F32(cpu_, {N, E}, ds0, "dscores"), ds_g = F32(*gpu_, {N, E}, ds0, "dscores");
    cpu_.MoeRouteBackward(ds_c, dg_c, s_c, i_c, spec);
    gpu_->MoeRouteBackward(ds_g, dg_g, s_g, i_g, spec);
    ExpectHealthy("MoeRouteBackward");
    ExpectClose("dscores", ToVector(*gpu_, ds_g), ToVector(cpu_, ds_c), 1e-5, E);
  }

  // ---- MoeExpertLoad: exact (output pre-filled with garbage: it overwrites) -----------
  {
    SCOPED_TRACE("MoeExpertLoad");
    Tensor i_c = MakeIndex(cpu_, {N, K}, idx_host), i_g = MakeIndex(*gpu_, {N, K}, idx_host);
    Tensor l_c = Alloc(cpu_, {E}, DType::kI32, "counts");
    Tensor l_g = MakeIndex(*gpu_, {E}, std::vector<int32_t>(static_cast<size_t>(E), 77));
    cpu_.MoeExpertLoad(l_c, i_c, c.E);
    gpu_->MoeExpertLoad(l_g, i_g, c.E);
    ExpectHealthy("MoeExpertLoad");
    ExpectExact("counts", ToVector(*gpu_, l_g), ToVector(cpu_, l_c), E);
  }

  // ---- MoePermute: offsets, slot and x_sorted exact ------------------------------------
  std::vector<int32_t> slot_host;
  {
    SCOPED_TRACE("MoePermute");
    const std::vector<double> x = RandomValues(static_cast<size_t>(N * D), ++seed);
    Tensor x_c = F32(cpu_, {N, D}, x, "x"), x_g = F32(*gpu_, {N, D}, x, "x");
    Tensor i_c = MakeIndex(cpu_, {N, K}, idx_host), i_g = MakeIndex(*gpu_, {N, K}, idx_host);
    Tensor xs_c = Alloc(cpu_, {NK, D}, DType::kF32, "x_sorted"), xs_g = Alloc(*gpu_, {NK, D}, DType::kF32, "x_sorted");
    Tensor o_c = Alloc(cpu_, {E + 1}, DType::kI32, "offsets");
    Tensor o_g = MakeIndex(*gpu_, {E + 1}, std::vector<int32_t>(static_cast<size_t>(E + 1), -5));
    Tensor sl_c = Alloc(cpu_, {N, K}, DType::kI32, "slot");
    Tensor sl_g = MakeIndex(*gpu_, {N, K}, std::vector<int32_t>(static_cast<size_t>(NK), -5));
    cpu_.MoePermute(xs_c, o_c, sl_c, x_c, i_c, c.E);
    gpu_->MoePermute(xs_g, o_g, sl_g, x_g, i_g, c.E);
    ExpectHealthy("MoePermute");
    ExpectExact("offsets", ToVector(*gpu_, o_g), ToVector(cpu_, o_c), E + 1);
    const std::vector<double> slot_cpu = ToVector(cpu_, sl_c);
    ExpectExact("slot", ToVector(*gpu_, sl_g), slot_cpu, K);
    ExpectExact("x_sorted", ToVector(*gpu_, xs_g), ToVector(cpu_, xs_c), D);
    slot_host = AsInt(slot_cpu);
  }

  // ---- MoePermuteBackward: dx += gathered rows, 1e-5 ------------------------------------
  {
    SCOPED_TRACE("MoePermuteBackward");
    const std::vector<double> dxs = RandomValues(static_cast<size_t>(NK * D), ++seed);
    const std::vector<double> dx0 = RandomValues(static_cast<size_t>(N * D), ++seed);
    Tensor dxs_c = F32(cpu_, {NK, D}, dxs, "dx_sorted"), dxs_g = F32(*gpu_, {NK, D}, dxs, "dx_sorted");
    Tensor dx_c = F32(cpu_, {N, D}, dx0, "dx"), dx_g = F32(*gpu_, {N, D}, dx0, "dx");
    Tensor sl_c = MakeIndex(cpu_, {N, K}, slot_host), sl_g = MakeIndex(*gpu_, {N, K}, slot_host);
    cpu_.MoePermuteBackward(dx_c, dxs_c, sl_c);
    gpu_->MoePermuteBackward(dx_g, dxs_g, sl_g);
    ExpectHealthy("MoePermuteBackward");
    ExpectClose("dx", ToVector(*gpu_, dx_g), ToVector(cpu_, dx_c), 1e-5, D);
  }

  // ---- MoeCombine: y += gated rows, 1e-5 ---------------------------------------------------
  const std::vector<double> ys = RandomValues(static_cast<size_t>(NK * D), ++seed);
  {
    SCOPED_TRACE("MoeCombine");
    const std::vector<double> y0 = RandomValues(static_cast<size_t>(N * D), ++seed);
    Tensor ys_c = F32(cpu_, {NK, D}, ys, "y_sorted"), ys_g = F32(*gpu_, {NK, D}, ys, "y_sorted");
    Tensor y_c = F32(cpu_, {N, D}, y0, "y"), y_g = F32(*gpu_, {N, D}, y0, "y");
    Tensor g_c = F32(cpu_, {N, K}, gate_cpu, "gate"), g_g = F32(*gpu_, {N, K}, gate_cpu, "gate");
    Tensor sl_c = MakeIndex(cpu_, {N, K}, slot_host), sl_g = MakeIndex(*gpu_, {N, K}, slot_host);
    cpu_.MoeCombine(y_c, ys_c, g_c, sl_c);
    gpu_->MoeCombine(y_g, ys_g, g_g, sl_g);
    ExpectHealthy("MoeCombine");
    ExpectClose("y", ToVector(*gpu_, y_g), ToVector(cpu_, y_c), 1e-5, D);
  }

  // ---- MoeCombineBackward: overwrites dy_sorted and dgate, 1e-5 ------------------------------
  {
    SCOPED_TRACE("MoeCombineBackward");
    const std::vector<double> dy = RandomValues(static_cast<size_t>(N * D), ++seed);
    const std::vector<double> garbage_rows(static_cast<size_t>(NK * D), 123.0),
        garbage_gate(static_cast<size_t>(NK), -9.0);
    Tensor dy_c = F32(cpu_, {N, D}, dy, "dy"), dy_g = F32(*gpu_, {N, D}, dy, "dy");
    Tensor ys_c = F32(cpu_, {NK, D}, ys, "y_sorted"), ys_g = F32(*gpu_, {NK, D}, ys, "y_sorted");
    Tensor g_c = F32(cpu_, {N, K}, gate_cpu, "gate"), g_g = F32(*gpu_, {N, K}, gate_cpu, "gate");
    Tensor sl_c = MakeIndex(cpu_, {N, K}, slot_host), sl_g = MakeIndex(*gpu_, {N, K}, slot_host);
    Tensor dys_c = F32(cpu_, {NK, D}, garbage_rows, "dy_sorted"),
           dys_g = F32(*gpu_, {NK, D}, garbage_rows, "dy_sorted");
    Tensor dg_c = F32(cpu_, {N, K}, garbage_gate, "dgate"), dg_g = F32(*gpu_, {N, K}, garbage_gate, "dgate");
    cpu_.MoeCombineBackward(dys_c, dg_c, dy_c, ys_c, g_c, sl_c);
    gpu_->MoeCombineBackward(dys_g, dg_g, dy_g, ys_g, g_g, sl_g);
    ExpectHealthy("MoeCombineBackward");
    ExpectClose("dy_sorted", ToVector(*gpu_, dys_g), ToVector(cpu_, dys_c), 1e-5, D);
    ExpectClose("dgate", ToVector(*gpu_, dg_g), ToVector(cpu_, dg_c), 1e-5, K);
  }

  // ---- MoeBalanceLoss (overwrites) and its backward (accumulates), 1e-5 -----------------------
  // alpha = 1 and a tiny initial dscores so the gradient dominates what is compared.
  {
    SCOPED_TRACE("MoeBalanceLoss");
    const double alpha = 1.0, dloss = 1.3;
    Tensor s_c = F32(cpu_, {N, E}, scores, "scores"), s_g = F32(*gpu_, {N, E}, scores, "scores");
    Tensor i_c = MakeIndex(cpu_, {N, K}, idx_host), i_g = MakeIndex(*gpu_, {N, K}, idx_host);
    Tensor l_c = F32(cpu_, {B}, std::vector<double>(static_cast<size_t>(B), 5.0), "loss");
    Tensor l_g = F32(*gpu_, {B}, std::vector<double>(static_cast<size_t>(B), 5.0), "loss");
    cpu_.MoeBalanceLoss(l_c, s_c, i_c, c.seq_len, alpha);
    gpu_->MoeBalanceLoss(l_g, s_g, i_g, c.seq_len, alpha);
    ExpectHealthy("MoeBalanceLoss");
    ExpectClose("loss", ToVector(*gpu_, l_g), ToVector(cpu_, l_c), 1e-5, 1);

    const std::vector<double> ds0 = RandomValues(static_cast<size_t>(N * E), ++seed, 1e-7);
    Tensor ds_c = F32(cpu_, {N, E}, ds0, "dscores"), ds_g = F32(*gpu_, {N, E}, ds0, "dscores");
    cpu_.MoeBalanceLossBackward(ds_c, s_c, i_c, c.seq_len, alpha, dloss);
    gpu_->MoeBalanceLossBackward(ds_g, s_g, i_g, c.seq_len, alpha, dloss);
    ExpectHealthy("MoeBalanceLossBackward");
    ExpectClose("dscores (balance)", ToVector(*gpu_, ds_g), ToVector(cpu_, ds_c), 1e-5, E);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaMoeTest, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// Same inputs twice: bitwise the same outputs (no float atomics, no races).
TEST(CudaMoeDeterminism, RepeatedRunsAreBitwiseEqual) {
  auto made = CudaBackend::Create(0, MatmulPrecision::kFp32);
  if (!made.ok()) GTEST_SKIP() << "no CUDA device: " << made.status().message();
  CudaBackend& gpu = *made.value();
  const int64_t N = 4096, E = 256, K = 8, D = 64, T = 1024;
  RoutingSpec spec;
  spec.top_k = K, spec.n_group = 8, spec.topk_group = 4, spec.scale = 2.5;
  std::vector<double> s = RandomValues(static_cast<size_t>(N * E), 7);
  for (double& v : s) v = 1.0 / (1.0 + std::exp(-v));
  Tensor scores = MakeTensor(gpu, {N, E}, DType::kF32, s, "scores");
  Tensor bias = MakeTensor(gpu, {E}, DType::kF32, RandomValues(E, 8, 0.05), "bias");
  Tensor x = MakeTensor(gpu, {N, D}, DType::kF32, RandomValues(static_cast<size_t>(N * D), 9), "x");
  auto run = [&](std::vector<double>& out) {
    Tensor idx = gpu.Alloc({N, K}, DType::kI32, "idx").value(), gate = gpu.Alloc({N, K}, DType::kF32, "gate").value();
    Tensor xs = gpu.Alloc({N * K, D}, DType::kF32, "xs").value(), off = gpu.Alloc({E + 1}, DType::kI32, "off").value();
    Tensor slot = gpu.Alloc({N, K}, DType::kI32, "slot").value(), y = gpu.Alloc({N, D}, DType::kF32, "y").value();
    Tensor loss = gpu.Alloc({N / T}, DType::kF32, "loss").value();
    Tensor ds = gpu.Alloc({N, E}, DType::kF32, "ds").value();
    gpu.MoeRoute(idx, gate, scores, bias, spec);
    gpu.MoePermute(xs, off, slot, x, idx, static_cast<int>(E));
    gpu.MoeCombine(y, xs, gate, slot);
    gpu.MoeBalanceLoss(loss, scores, idx, static_cast<int>(T), 1e-4);
    gpu.MoeBalanceLossBackward(ds, scores, idx, static_cast<int>(T), 1e-4, 1.0);
    const Status st = gpu.Synchronize();
    ASSERT_TRUE(st.ok()) << st.message();
    for (const Tensor* t : {&idx, &gate, &slot, &y, &loss, &ds}) {
      const std::vector<double> v = ToVector(gpu, *t);
      out.insert(out.end(), v.begin(), v.end());
    }
  };
  std::vector<double> first, second;
  run(first);
  run(second);
  ASSERT_EQ(first.size(), second.size());
  EXPECT_TRUE(first == second) << "two runs on the same inputs differ";
}

// A spec the kernels cannot honour becomes the sticky error, naming the op.
TEST(CudaMoeErrors, BadSpecFailsWithAMessage) {
  auto made = CudaBackend::Create(0, MatmulPrecision::kFp32);
  if (!made.ok()) GTEST_SKIP() << "no CUDA device: " << made.status().message();
  CudaBackend& gpu = *made.value();
  Tensor scores = gpu.Alloc({4, 10}, DType::kF32, "scores").value();
  Tensor bias = gpu.Alloc({10}, DType::kF32, "bias").value();
  Tensor idx = gpu.Alloc({4, 2}, DType::kI32, "idx").value();
  Tensor gate = gpu.Alloc({4, 2}, DType::kF32, "gate").value();
  RoutingSpec spec;
  spec.top_k = 2, spec.n_group = 3, spec.topk_group = 1;  // 3 does not divide 10
  gpu.MoeRoute(idx, gate, scores, bias, spec);
  const Status st = gpu.Synchronize();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("MoeRoute"), std::string::npos) << st.message();
}

#else  // !TROUPE_HAVE_CUDA

TEST(CudaMoeTest, Skipped) { GTEST_SKIP() << "no CUDA device: built without the CUDA backend"; }

#endif

}  // namespace
}  // namespace troupe
