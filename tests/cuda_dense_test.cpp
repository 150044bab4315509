// CudaBackend dense, norm/activation, embedding, loss, reduction and optimizer
// ops against the CPU reference (CpuBackend, F32), op by op, plus allocation
// failure. Skipped (with the reason) where no CUDA device is usable.
//
// Every comparison prints one line:
//   [cuda-vs-cpu] <op> n=<elements> max_abs=<max|gpu-cpu|> rel=<max_abs / max(max|cpu|, 1e-6)>
// and fails when rel exceeds the tolerance:
//  - kFp32Tol 1e-5: both sides are fp32 with different summation orders
//    (cuBLAS vs OpenBLAS blocking, warp trees vs sequential loops); errors are
//    ~1e-7 relative to the largest value, so 1e-5 still catches any real bug
//    (a wrong index or formula gives > 1e-2).
//  - kBf16Tol 1e-2: bf16 GEMM inputs keep 8 bits of mantissa (relative rounding
//    2^-9 ~ 2e-3 per input); random-sign errors over K terms stay well below
//    1% of the largest output.
//  - kSumTol 1e-9: Sum/SumSquares accumulate in double on both sides; only
//    the order of ~1e7 double additions differs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "test_util.h"

#if defined(TROUPE_HAVE_CUDA)
#include "gpu/cuda/cuda_backend.h"
#endif

namespace troupe {
namespace {

using testing::MakeIndex;
using testing::MakeTensor;
using testing::RandomValues;
using testing::ToVector;

constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 1e-2;
constexpr double kSumTol = 1e-9;

// max|got - want| / max(max|want|, 1e-6), printed; NaN anywhere counts as failure.
double RelError(const std::vector<double>& got, const std::vector<double>& want, const std::string& what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  double max_abs = 0.0, scale = 1e-6;
  bool nan = false;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) nan = true;
    if (std::isnan(got[i]) || std::isnan(want[i])) continue;
    max_abs = std::max(max_abs, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  const double rel = nan ? INFINITY : max_abs / scale;
  std::printf("[cuda-vs-cpu] %-44s n=%-9zu max_abs=%.3e rel=%.3e%s\n", what.c_str(), want.size(), max_abs, rel,
              nan ? " (NaN mismatch)" : "");
  return rel;
}

#if defined(TROUPE_HAVE_CUDA)

class CudaDenseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto be = CudaBackend::Create(0, MatmulPrecision::kFp32);
    if (!be.ok()) GTEST_SKIP() << "no CUDA device: " << be.status().message();
    gpu_ = std::move(be).value();
  }

  // A tensor of `shape` on one backend holding `values` (F32).
  static Tensor Make(Backend& be, std::vector<int64_t> shape, const std::vector<double>& values,
                     const std::string& name = "t") {
    return MakeTensor(be, std::move(shape), DType::kF32, values, name);
  }

  // The same random values on the CPU and on `gpu`.
  struct Twin {
    Tensor cpu, gpu;
  };
  Twin Random(std::vector<int64_t> shape, uint64_t seed, double stddev = 1.0, Backend* gpu = nullptr) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    const std::vector<double> v = RandomValues(static_cast<size_t>(n), seed, stddev);
    return {Make(cpu_, shape, v), Make(gpu ? *gpu : *gpu_, shape, v)};
  }
  Twin Index(std::vector<int64_t> shape, const std::vector<int32_t>& v, Backend* gpu = nullptr) {
    return {MakeIndex(cpu_, shape, v), MakeIndex(gpu ? *gpu : *gpu_, shape, v)};
  }

  // Fails the test (with the backend's message) if the GPU recorded an error.
  void ExpectGpuOk(Backend& gpu, const std::string& what) {
    const Status st = gpu.Synchronize();
    EXPECT_TRUE(st.ok()) << what << ": " << st.message();
  }

  // Compares a GPU tensor with its CPU twin; returns the relative error.
  double Compare(const Twin& t, const std::string& what, double tol, Backend* gpu = nullptr) {
    Backend& g = gpu ? *gpu : *gpu_;
    ExpectGpuOk(g, what);
    const double rel = RelError(ToVector(g, t.gpu), ToVector(cpu_, t.cpu), what);
    EXPECT_LE(rel, tol) << what;
    return rel;
  }

  std::unique_ptr<CudaBackend> MakeBf16() {
    auto be = CudaBackend::Create(0, MatmulPrecision::kBf16);
    EXPECT_TRUE(be.ok()) << be.status().message();
    return be.ok() ? std::move(be).value() : nullptr;
  }

  // c = alpha op(a) op(b) + beta c on both backends, compared.
  double RunMatmul(Backend& gpu, int64_t M, int64_t N, int64_t K, bool ta, bool tb, double alpha, double beta,
                   double tol, const std::string& tag) {
    auto a = Random(ta ? std::vector<int64_t>{K, M} : std::vector<int64_t>{M, K}, 11, 1.0, &gpu);
    auto b = Random(tb ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N}, 12, 1.0, &gpu);
    auto c = Random({M, N}, 13, 1.0, &gpu);
    cpu_.Matmul(c.cpu, a.cpu, b.cpu, ta, tb, alpha, beta);
    gpu.Matmul(c.gpu, a.gpu, b.gpu, ta, tb, alpha, beta);
    return Compare(c,
                   tag + " Matmul " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                       (ta ? " ta" : "") + (tb ? " tb" : ""),
                   tol, &gpu);
  }

  // Forward and backward of one grouped layer; `tail` rows after offsets[E]
  // belong to no expert (forward must leave them alone). With `repeat`, the
  // backward runs again from the same din, dw and must match bitwise.
  void RunGrouped(Backend& gpu, const std::vector<int32_t>& counts, int64_t tail, int64_t I, int64_t O, double tol,
                  const std::string& tag, bool repeat = false) {
    std::vector<int32_t> off(counts.size() + 1, 0);
    for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
    const int64_t E = static_cast<int64_t>(counts.size()), R = off.back() + tail;
    const std::string shape =
        " E=" + std::to_string(E) + " R=" + std::to_string(R) + " I=" + std::to_string(I) + " O=" + std::to_string(O);
    auto offsets = Index({E + 1}, off, &gpu);
    auto in = Random({R, I}, 21, 1.0, &gpu), w = Random({E, O, I}, 22, 0.2, &gpu), out = Random({R, O}, 23, 1.0, &gpu);
    cpu_.GroupedLinearForward(out.cpu, in.cpu, w.cpu, offsets.cpu);
    gpu.GroupedLinearForward(out.gpu, in.gpu, w.gpu, offsets.gpu);
    Compare(out, tag + " GroupedLinearForward" + shape, tol, &gpu);
    // Backward adds: start from random din, dw.
    auto dout = Random({R, O}, 24, 1.0, &gpu), din = Random({R, I}, 25, 1.0, &gpu),
         dw = Random({E, O, I}, 26, 1.0, &gpu);
    cpu_.GroupedLinearBackward(din.cpu, dw.cpu, dout.cpu, in.cpu, w.cpu, offsets.cpu);
    gpu.GroupedLinearBackward(din.gpu, dw.gpu, dout.gpu, in.gpu, w.gpu, offsets.gpu);
    Compare(din, tag + " GroupedLinearBackward din" + shape, tol, &gpu);
    Compare(dw, tag + " GroupedLinearBackward dw" + shape, tol, &gpu);
    if (!repeat) return;
    auto din2 = Random({R, I}, 25, 1.0, &gpu), dw2 = Random({E, O, I}, 26, 1.0, &gpu);
    gpu.GroupedLinearBackward(din2.gpu, dw2.gpu, dout.gpu, in.gpu, w.gpu, offsets.gpu);
    ExpectGpuOk(gpu, tag + " GroupedLinearBackward again");
    for (auto [first, again, name] : {std::tuple{&din, &din2, "din"}, std::tuple{&dw, &dw2, "dw"}}) {
      std::vector<float> x(static_cast<size_t>(first->gpu.numel())), y(x.size());
      gpu.CopyToHost(x.data(), first->gpu);
      gpu.CopyToHost(y.data(), again->gpu);
      EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float)))
          << tag << " GroupedLinearBackward " << name << " not deterministic" << shape;
    }
    // Zero-bubble pipelines run the halves apart (B: din, later W: dw); an
    // undefined tensor skips its half, and the halves equal the whole.
    auto din3 = Random({R, I}, 25, 1.0, &gpu), dw3 = Random({E, O, I}, 26, 1.0, &gpu);
    Tensor none;
    gpu.GroupedLinearBackward(din3.gpu, none, dout.gpu, in.gpu, w.gpu, offsets.gpu);
    gpu.GroupedLinearBackward(none, dw3.gpu, dout.gpu, in.gpu, w.gpu, offsets.gpu);
    ExpectGpuOk(gpu, tag + " GroupedLinearBackward halves");
    for (auto [first, half, name] : {std::tuple{&din, &din3, "din"}, std::tuple{&dw, &dw3, "dw"}}) {
      std::vector<float> x(static_cast<size_t>(first->gpu.numel())), y(x.size());
      gpu.CopyToHost(x.data(), first->gpu);
      gpu.CopyToHost(y.data(), half->gpu);
      EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float)))
          << tag << " GroupedLinearBackward " << name << " alone differs from the fused call" << shape;
    }
  }

  CpuBackend cpu_{0};
  std::unique_ptr<CudaBackend> gpu_;
};

// ---- GEMM ----------------------------------------------------------------------------

TEST_F(CudaDenseTest, MatmulAllTransposesOddShapes) {
  const int64_t shapes[][3] = {{1, 1, 1}, {37, 53, 29}, {300, 70, 33}, {5, 600, 17}, {129, 257, 131}, {4, 3, 0}};
  for (auto& s : shapes)
    for (int tr = 0; tr < 4; ++tr) RunMatmul(*gpu_, s[0], s[1], s[2], tr & 1, tr & 2, 0.7, 0.3, kFp32Tol, "fp32");
}

TEST_F(CudaDenseTest, MatmulBetaZeroIgnoresNaNInOutput) {
  auto a = Random({33, 20}, 1), b = Random({20, 45}, 2);
  Twin c{Make(cpu_, {33, 45}, std::vector<double>(33 * 45, NAN)),
         Make(*gpu_, {33, 45}, std::vector<double>(33 * 45, NAN))};
  cpu_.Matmul(c.cpu, a.cpu, b.cpu, false, false, 1.0, 0.0);
  gpu_->Matmul(c.gpu, a.gpu, b.gpu, false, false, 1.0, 0.0);
  Compare(c, "fp32 Matmul beta=0 over NaN", kFp32Tol);
}

TEST_F(CudaDenseTest, MatmulLargeFp32AndBf16) {
  const int64_t M = 4096, N = 1024, K = 512;
  RunMatmul(*gpu_, M, N, K, false, true, 1.0, 0.0, kFp32Tol, "fp32");
  auto bf = MakeBf16();
  ASSERT_NE(bf, nullptr);
  double rel_nn = 0.0;
  for (int tr = 0; tr < 4; ++tr) {
    const double r = RunMatmul(*bf, M, N, K, tr & 1, tr & 2, 1.0, 0.5, kBf16Tol, "bf16");
    if (tr == 0) rel_nn = r;
  }
  // bf16 inputs must actually be in use: an fp32 GEMM would sit near 1e-7.
  EXPECT_GT(rel_nn, 1e-5) << "kBf16 Matmul looks like fp32: is CUBLAS_COMPUTE_32F_FAST_16BF in effect?";
  // Odd shapes in bf16 mode too (unaligned leading dimensions).
  RunMatmul(*bf, 129, 257, 131, true, false, 0.7, 0.3, kBf16Tol, "bf16");
}

// ---- grouped linear (routed experts) ----------------------------------------------------

TEST_F(CudaDenseTest, GroupedLinearFp32AndBf16) {
  struct Case {
    std::vector<int32_t> counts;
    int64_t tail, I, O;
  };
  const std::vector<Case> cases = {
      {{37, 0, 130, 1, 64}, 5, 45, 72},                      // an empty expert, odd widths, unowned tail rows
      {{0, 3, 0}, 0, 16, 8},                                 // mostly empty
      {{700, 0, 333, 1200, 64, 900, 1, 800}, 0, 1024, 512},  // large-ish, aligned widths
  };
  auto bf = MakeBf16();
  ASSERT_NE(bf, nullptr);
  for (const Case& c : cases) {
    RunGrouped(*gpu_, c.counts, c.tail, c.I, c.O, kFp32Tol, "fp32");
    RunGrouped(*bf, c.counts, c.tail, c.I, c.O, kBf16Tol, "bf16");
  }
}

// Thousands of rows per expert: the weight gradient is cut into several row
// chunks per expert (full ones read in place, a zero-padded tail) whose
// partials are reduced per expert. Uneven counts, an empty expert, a
// one-row expert; aligned widths (FAST compute in bf16) and odd ones (32F
// fallback); bitwise repeatable.
TEST_F(CudaDenseTest, GroupedLinearBackwardManyRowsDeterministic) {
  const std::vector<int32_t> counts = {3001, 2500, 0, 3999, 2048, 3100, 1, 2777};
  auto bf = MakeBf16();
  ASSERT_NE(bf, nullptr);
  for (auto [I, O] : {std::pair<int64_t, int64_t>{512, 512}, {256, 512}, {130, 67}}) {
    RunGrouped(*gpu_, counts, 3, I, O, kFp32Tol, "fp32", true);
    RunGrouped(*bf, counts, 3, I, O, kBf16Tol, "bf16", true);
  }
}

TEST_F(CudaDenseTest, GroupedLinearRejectsBadOffsets) {
  auto in = Random({10, 4}, 1), w = Random({2, 3, 4}, 2), out = Random({10, 3}, 3);
  auto offsets = Index({3}, {0, 8, 5});  // decreasing
  gpu_->GroupedLinearForward(out.gpu, in.gpu, w.gpu, offsets.gpu);
  const Status st = gpu_->Synchronize();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("offsets"), std::string::npos) << st.message();
}

// ---- elementwise ----------------------------------------------------------------------------

TEST_F(CudaDenseTest, AddAxpyScale) {
  const int64_t n = 1000003;
  auto a = Random({n}, 1), b = Random({n}, 2), out = Random({n}, 3);
  cpu_.Add(out.cpu, a.cpu, b.cpu);
  gpu_->Add(out.gpu, a.gpu, b.gpu);
  Compare(out, "Add", kFp32Tol);
  cpu_.Add(a.cpu, a.cpu, b.cpu);  // aliasing: out == a
  gpu_->Add(a.gpu, a.gpu, b.gpu);
  Compare(a, "Add (out aliases a)", kFp32Tol);
  cpu_.Axpy(b.cpu, -0.37, out.cpu);
  gpu_->Axpy(b.gpu, -0.37, out.gpu);
  Compare(b, "Axpy", kFp32Tol);
  cpu_.Scale(out.cpu, 1.7);
  gpu_->Scale(out.gpu, 1.7);
  Compare(out, "Scale", kFp32Tol);
}

TEST_F(CudaDenseTest, ConcatColsForwardBackward) {
  const int64_t N = 333, A = 17, B = 40;
  auto a = Random({N, A}, 1), b = Random({N, B}, 2), out = Random({N, A + B}, 3);
  cpu_.ConcatCols(out.cpu, a.cpu, b.cpu);
  gpu_->ConcatCols(out.gpu, a.gpu, b.gpu);
  Compare(out, "ConcatCols", kFp32Tol);
  auto dout = Random({N, A + B}, 4);
  cpu_.ConcatColsBackward(a.cpu, b.cpu, dout.cpu);
  gpu_->ConcatColsBackward(a.gpu, b.gpu, dout.gpu);
  Compare(a, "ConcatColsBackward da", kFp32Tol);
  Compare(b, "ConcatColsBackward db", kFp32Tol);
}

// ---- normalisation and activations ---------------------------------------------------------------

TEST_F(CudaDenseTest, RmsNormForwardBackward) {
  const int64_t shapes[][2] = {{517, 2048}, {1000, 45}, {3, 7168}, {2, 1}};
  for (auto& s : shapes) {
    const int64_t N = s[0], C = s[1];
    const std::string tag = " N=" + std::to_string(N) + " C=" + std::to_string(C);
    auto in = Random({N, C}, 1, 2.0), w = Random({C}, 2), out = Random({N, C}, 3), rstd = Random({N}, 4);
    cpu_.RmsNormForward(out.cpu, rstd.cpu, in.cpu, w.cpu, 1e-6);
    gpu_->RmsNormForward(out.gpu, rstd.gpu, in.gpu, w.gpu, 1e-6);
    Compare(out, "RmsNormForward out" + tag, kFp32Tol);
    Compare(rstd, "RmsNormForward rstd" + tag, kFp32Tol);
    auto dout = Random({N, C}, 5), din = Random({N, C}, 6), dw = Random({C}, 7);
    cpu_.RmsNormBackward(din.cpu, dw.cpu, dout.cpu, in.cpu, w.cpu, rstd.cpu);
    gpu_->RmsNormBackward(din.gpu, dw.gpu, dout.gpu, in.gpu, w.gpu, rstd.gpu);
    Compare(din, "RmsNormBackward din" + tag, kFp32Tol);
    Compare(dw, "RmsNormBackward dw" + tag, kFp32Tol);
  }
}

TEST_F(CudaDenseTest, SwiGluForwardBackward) {
  const int64_t N = 301, F = 97;
  auto gu = Random({N, 2 * F}, 1, 3.0), out = Random({N, F}, 2);
  cpu_.SwiGluForward(out.cpu, gu.cpu);
  gpu_->SwiGluForward(out.gpu, gu.gpu);
  Compare(out, "SwiGluForward", kFp32Tol);
  auto dout = Random({N, F}, 3), dgu = Random({N, 2 * F}, 4);
  cpu_.SwiGluBackward(dgu.cpu, dout.cpu, gu.cpu);
  gpu_->SwiGluBackward(dgu.gpu, dout.gpu, gu.gpu);
  Compare(dgu, "SwiGluBackward", kFp32Tol);
}

TEST_F(CudaDenseTest, SigmoidForwardBackward) {
  const int64_t n = 100003;
  auto in = Random({n}, 1, 10.0), out = Random({n}, 2);  // large |x|: both branches, saturation
  cpu_.SigmoidForward(out.cpu, in.cpu);
  gpu_->SigmoidForward(out.gpu, in.gpu);
  Compare(out, "SigmoidForward", kFp32Tol);
  auto dout = Random({n}, 3), din = Random({n}, 4);
  cpu_.SigmoidBackward(din.cpu, dout.cpu, out.cpu);
  gpu_->SigmoidBackward(din.gpu, dout.gpu, out.gpu);
  Compare(din, "SigmoidBackward", kFp32Tol);
}

// ---- embedding and loss ---------------------------------------------------------------------------

// Zipf-like tokens (a few very frequent ones, as in text), some never used.
std::vector<int32_t> SkewedTokens(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(std::min<double>(V - 1, std::floor(std::pow(V, u(rng))) - 1));
  return t;
}

TEST_F(CudaDenseTest, EmbeddingForwardBackwardDeterministic) {
  struct Case {
    int64_t N, V, D;
  };
  for (const Case& c : {Case{16384, 2048, 300}, Case{1000, 70000, 64}, Case{7, 5, 3}}) {
    const std::string tag = " N=" + std::to_string(c.N) + " V=" + std::to_string(c.V) + " D=" + std::to_string(c.D);
    const std::vector<int32_t> tok = SkewedTokens(c.N, c.V, 5 + c.N);
    auto tokens = Index({c.N}, tok);
    auto table = Random({c.V, c.D}, 1), out = Random({c.N, c.D}, 2);
    cpu_.EmbeddingForward(out.cpu, tokens.cpu, table.cpu);
    gpu_->EmbeddingForward(out.gpu, tokens.gpu, table.gpu);
    Compare(out, "EmbeddingForward" + tag, kFp32Tol);
    // dtable accumulates up to thousands of rows per frequent token in fp32, in
    // a different (but fixed) order than the CPU: ~1e-7 relative, within 1e-5.
    auto dout = Random({c.N, c.D}, 3), dtable = Random({c.V, c.D}, 4);
    const std::vector<double> before = ToVector(*gpu_, dtable.gpu);
    cpu_.EmbeddingBackward(dtable.cpu, dout.cpu, tokens.cpu);
    gpu_->EmbeddingBackward(dtable.gpu, dout.gpu, tokens.gpu);
    Compare(dtable, "EmbeddingBackward" + tag, kFp32Tol);
    // Bitwise repeatable: run again from the same start.
    Tensor again = Make(*gpu_, {c.V, c.D}, before);
    gpu_->EmbeddingBackward(again, dout.gpu, tokens.gpu);
    ExpectGpuOk(*gpu_, "EmbeddingBackward again");
    std::vector<float> x(static_cast<size_t>(c.V * c.D)), y(x.size());
    gpu_->CopyToHost(x.data(), dtable.gpu);
    gpu_->CopyToHost(y.data(), again);
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float)))
        << "EmbeddingBackward not deterministic" << tag;
  }
}

TEST_F(CudaDenseTest, CrossEntropyForwardBackward) {
  struct Case {
    int64_t N, V;
  };
  for (const Case& c : {Case{257, 32003}, Case{64, 7}, Case{3, 1}}) {
    const std::string tag = " N=" + std::to_string(c.N) + " V=" + std::to_string(c.V);
    std::vector<int32_t> tgt(static_cast<size_t>(c.N));
    for (int64_t n = 0; n < c.N; ++n)
      tgt[n] = n % 5 == 3 ? -1 : static_cast<int32_t>((n * 7919) % c.V);  // some ignored
    auto targets = Index({c.N}, tgt);
    auto logits = Random({c.N, c.V}, 1, 3.0), losses = Random({c.N}, 2);
    cpu_.CrossEntropyForward(losses.cpu, logits.cpu, targets.cpu);
    gpu_->CrossEntropyForward(losses.gpu, logits.gpu, targets.gpu);
    Compare(losses, "CrossEntropyForward" + tag, kFp32Tol);
    const double dloss = 1.0 / static_cast<double>(c.N);
    auto dlogits = Random({c.N, c.V}, 3);  // overwritten
    cpu_.CrossEntropyBackward(dlogits.cpu, logits.cpu, targets.cpu, dloss);
    gpu_->CrossEntropyBackward(dlogits.gpu, logits.gpu, targets.gpu, dloss);
    Compare(dlogits, "CrossEntropyBackward" + tag, kFp32Tol);
    // In place: dlogits aliases logits.
    cpu_.CrossEntropyBackward(logits.cpu, logits.cpu, targets.cpu, dloss);
    gpu_->CrossEntropyBackward(logits.gpu, logits.gpu, targets.gpu, dloss);
    Compare(logits, "CrossEntropyBackward in place" + tag, kFp32Tol);
  }
}

// ---- reductions and the optimizer --------------------------------------------------------------------

TEST_F(CudaDenseTest, SumAndSumSquaresDeterministic) {
  for (int64_t n : {int64_t{1}, int64_t{8193}, int64_t{10000007}}) {
    auto x = Random({n}, 1, 1.0);
    const double cs = cpu_.Sum(x.cpu), gs = gpu_->Sum(x.gpu);
    const double cq = cpu_.SumSquares(x.cpu), gq = gpu_->SumSquares(x.gpu);
    ExpectGpuOk(*gpu_, "Sum");
    // Sum of N(0,1) cancels: measure against sum |x| ~ 0.8 n instead.
    const double rel_s = std::abs(gs - cs) / std::max(0.8 * static_cast<double>(n), 1e-6);
    const double rel_q = std::abs(gq - cq) / std::max(std::abs(cq), 1e-6);
    std::printf("[cuda-vs-cpu] Sum n=%lld cpu=%.17g gpu=%.17g rel=%.3e\n", static_cast<long long>(n), cs, gs, rel_s);
    std::printf("[cuda-vs-cpu] SumSquares n=%lld cpu=%.17g gpu=%.17g rel=%.3e\n", static_cast<long long>(n), cq, gq,
                rel_q);
    EXPECT_LE(rel_s, kSumTol);
    EXPECT_LE(rel_q, kSumTol);
    EXPECT_EQ(gs, gpu_->Sum(x.gpu)) << "Sum not deterministic";
    EXPECT_EQ(gq, gpu_->SumSquares(x.gpu)) << "SumSquares not deterministic";
  }
}

TEST_F(CudaDenseTest, AdamWStep) {
  const int64_t n = 100003;
  auto p = Random({n}, 1), g = Random({n}, 2), m = Random({n}, 3, 0.1), v = Random({n}, 4, 0.1);
  // v must be >= 0: square it on the host and reload.
  std::vector<double> vv = ToVector(cpu_, v.cpu);
  for (double& x : vv) x = x * x;
  v = Twin{Make(cpu_, {n}, vv), Make(*gpu_, {n}, vv)};
  AdamWParams ap;
  ap.lr = 3e-3;
  ap.weight_decay = 0.1;
  ap.step = 7;
  ap.grad_scale = 0.5;
  for (int it = 0; it < 3; ++it, ++ap.step) {
    cpu_.AdamWStep(p.cpu, g.cpu, m.cpu, v.cpu, ap);
    gpu_->AdamWStep(p.gpu, g.gpu, m.gpu, v.gpu, ap);
  }
  Compare(p, "AdamWStep param", kFp32Tol);
  Compare(m, "AdamWStep m", kFp32Tol);
  Compare(v, "AdamWStep v", kFp32Tol);
}

// ---- memory ----------------------------------------------------------------------------------------------

TEST_F(CudaDenseTest, AbsurdAllocIsOutOfMemoryAndBackendStaysUsable) {
  auto big = gpu_->Alloc({10000000000000LL}, DType::kF32, "absurd_tensor");  // 4e13 bytes
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), StatusCode::kOutOfMemory);
  EXPECT_NE(big.status().message().find("absurd_tensor"), std::string::npos) << big.status().message();
  std::printf("[cuda] OOM message: %s\n", big.status().message().c_str());
  // Still usable: allocate, compute, synchronize.
  auto a = Random({1000}, 1), b = Random({1000}, 2), out = Random({1000}, 3);
  cpu_.Add(out.cpu, a.cpu, b.cpu);
  gpu_->Add(out.gpu, a.gpu, b.gpu);
  Compare(out, "Add after failed Alloc", kFp32Tol);
  EXPECT_TRUE(gpu_->Synchronize().ok());
}

// A checkpoint capture copies whole tensors to host memory: small, MiB-sized
// and ragged sizes must all arrive byte for byte, at an unaligned destination,
// without touching the byte before it.
TEST_F(CudaDenseTest, LargeCopyToHostIsExactAtEveryChunkBoundary) {
  const int64_t mib = (1 << 20) / 4;  // floats per MiB
  for (int64_t n : {int64_t{1000}, 2 * mib - 1, 2 * mib, 4 * mib, 16 * mib - 3, 16 * mib, 16 * mib + 1, 45 * mib + 7}) {
    std::vector<float> host(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) host[i] = static_cast<float>(i % 100003) * 0.5f - static_cast<float>(i % 7);
    auto t = gpu_->Alloc({n}, DType::kF32, "copy_src");
    ASSERT_TRUE(t.ok()) << t.status().message();
    gpu_->CopyFromHost(*t, host.data());
    std::vector<float> back(static_cast<size_t>(n) + 1, -1.0f);
    gpu_->CopyToHost(back.data() + 1, *t);  // an odd destination offset (4 bytes)
    ASSERT_TRUE(gpu_->Synchronize().ok());
    EXPECT_EQ(back[0], -1.0f) << "wrote before the destination, n=" << n;
    EXPECT_EQ(0, std::memcmp(back.data() + 1, host.data(), host.size() * sizeof(float))) << "n=" << n;
  }
}

#else  // !TROUPE_HAVE_CUDA

TEST(CudaDenseTest, NotBuilt) { GTEST_SKIP() << "no CUDA device: built without TROUPE_CUDA"; }

#endif

}  // namespace
}  // namespace troupe
