// CpuBackend dense, norm/activation, loss and optimizer ops against naive
// double-precision loops, finite-difference gradient checks in F64, and
// bitwise thread-count independence on F32.
//
// Tolerances: F64 kernels vs a naive double loop differ only by summation
// order, ~1e-15 relative, so 1e-10 catches any real error. F32 kernels are
// compared at 1e-4 relative (24-bit mantissa, sums of <= a few hundred terms).
// Gradient checks use GradCheckError < 1e-6 (test_util.h: correct formulas
// reach ~1e-8, wrong ones > 1e-2).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "test_util.h"

namespace troupe {
namespace {

using testing::GradCheckError;
using testing::MakeIndex;
using testing::MakeTensor;
using testing::RandomTensor;
using testing::RandomValues;
using testing::ToVector;

constexpr double kTolF64 = 1e-10;
constexpr double kTolF32 = 1e-4;
constexpr double kGradTol = 1e-6;

Tensor Zeros(Backend& be, std::vector<int64_t> shape, DType dt) {
  auto t = be.Alloc(std::move(shape), dt, "zeros");
  EXPECT_TRUE(t.ok());
  return t.value();
}

// sum_i t[i] * r[i]: a scalar loss whose gradient w.r.t. t is r.
double Dot(Backend& be, const Tensor& t, const std::vector<double>& r) {
  std::vector<double> v = ToVector(be, t);
  double s = 0.0;
  for (size_t i = 0; i < v.size(); ++i) s += v[i] * r[i];
  return s;
}

void ExpectNear(const std::vector<double>& got, const std::vector<double>& want, double rel_tol,
                const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 1e-30;
  for (double w : want) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], rel_tol * scale) << what << " at " << i;
}

bool BitwiseEqual(Backend& be, const Tensor& a, const Tensor& b) {
  std::vector<char> x(a.bytes()), y(b.bytes());
  be.CopyToHost(x.data(), a);
  be.CopyToHost(y.data(), b);
  return x == y;
}

// c = alpha op(a) op(b) + beta c, naively in double.
std::vector<double> NaiveMatmul(const std::vector<double>& a, const std::vector<double>& b, std::vector<double> c,
                                int64_t M, int64_t N, int64_t K, bool ta, bool tb, double alpha, double beta) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += (ta ? a[k * M + i] : a[i * K + k]) * (tb ? b[j * K + k] : b[k * N + j]);
      c[i * N + j] = alpha * s + beta * c[i * N + j];
    }
  return c;
}

class CpuOpsTest : public ::testing::Test {
 protected:
  CpuBackend be{2};
};

// ---- dense -------------------------------------------------------------------

TEST_F(CpuOpsTest, MatmulMatchesNaiveAllTransposesAndTilings) {
  // (M, N, K): row tiles with a ragged last tile, column tiles, one call, K = 0.
  const int64_t shapes[][3] = {{300, 70, 33}, {5, 600, 17}, {131, 67, 50}, {4, 3, 0}};
  for (DType dt : {DType::kF64, DType::kF32}) {
    for (auto& s : shapes) {
      const int64_t M = s[0], N = s[1], K = s[2];
      for (int t = 0; t < 4; ++t) {
        const bool ta = t & 1, tb = t & 2;
        std::vector<double> av = RandomValues(M * K, 1 + t), bv = RandomValues(K * N, 2 + t),
                            cv = RandomValues(M * N, 3 + t);
        Tensor a = MakeTensor(be, ta ? std::vector<int64_t>{K, M} : std::vector<int64_t>{M, K}, dt, av);
        Tensor b = MakeTensor(be, tb ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N}, dt, bv);
        Tensor c = MakeTensor(be, {M, N}, dt, cv);
        be.Matmul(c, a, b, ta, tb, 0.7, 0.3);
        ExpectNear(ToVector(be, c), NaiveMatmul(av, bv, cv, M, N, K, ta, tb, 0.7, 0.3),
                   dt == DType::kF64 ? kTolF64 : kTolF32, "matmul");
      }
    }
  }
}

TEST_F(CpuOpsTest, MatmulBetaZeroIgnoresOldC) {
  Tensor a = RandomTensor(be, {3, 4}, DType::kF64, 1);
  Tensor b = RandomTensor(be, {4, 5}, DType::kF64, 2);
  Tensor c = MakeTensor(be, {3, 5}, DType::kF64, std::vector<double>(15, NAN));
  be.Matmul(c, a, b, false, false, 1.0, 0.0);
  ExpectNear(ToVector(be, c),
             NaiveMatmul(ToVector(be, a), ToVector(be, b), std::vector<double>(15, 0.0), 3, 5, 4, false, false, 1, 0),
             kTolF64, "beta=0");
}

// A linear layer y = x W^T (W [O, I], trans_b) or y = x W (W [I, O]); its
// backward is two more Matmuls (dx = dy op(W)^T, dW += x^T dy or dy^T x).
TEST_F(CpuOpsTest, MatmulLinearLayerGradients) {
  const int64_t N = 7, I = 5, O = 6;
  for (bool w_out_in : {true, false}) {
    Tensor x = RandomTensor(be, {N, I}, DType::kF64, 10);
    Tensor w = RandomTensor(be, w_out_in ? std::vector<int64_t>{O, I} : std::vector<int64_t>{I, O}, DType::kF64, 11);
    Tensor y = Zeros(be, {N, O}, DType::kF64);
    const std::vector<double> r = RandomValues(N * O, 12);
    auto loss = [&] {
      be.Matmul(y, x, w, false, w_out_in, 1.0, 0.0);
      return Dot(be, y, r);
    };
    Tensor dy = MakeTensor(be, {N, O}, DType::kF64, r);
    Tensor dx = Zeros(be, {N, I}, DType::kF64);
    Tensor dw = Zeros(be, w.shape(), DType::kF64);
    if (w_out_in) {
      be.Matmul(dx, dy, w, false, false, 1.0, 1.0);  // dx [N,I] = dy [N,O] W [O,I]
      be.Matmul(dw, dy, x, true, false, 1.0, 1.0);   // dW [O,I] = dy^T x
    } else {
      be.Matmul(dx, dy, w, false, true, 1.0, 1.0);   // dx = dy W^T
      be.Matmul(dw, x, dy, true, false, 1.0, 1.0);   // dW [I,O] = x^T dy
    }
    EXPECT_LT(GradCheckError(x, dx, loss), kGradTol);
    EXPECT_LT(GradCheckError(w, dw, loss), kGradTol);
  }
}

TEST_F(CpuOpsTest, GroupedLinearMatchesNaive) {
  // Expert 1 is empty; expert 0 spans two row tiles; O spans two dw tiles.
  const int64_t E = 4, R = 300, I = 20, O = 150;
  const std::vector<int32_t> off = {0, 140, 140, 290, 300};
  Tensor offsets = MakeIndex(be, {E + 1}, off);
  std::vector<double> xv = RandomValues(R * I, 1), wv = RandomValues(E * O * I, 2), gv = RandomValues(R * O, 3);
  std::vector<double> dx0 = RandomValues(R * I, 4), dw0 = RandomValues(E * O * I, 5);
  Tensor x = MakeTensor(be, {R, I}, DType::kF64, xv), w = MakeTensor(be, {E, O, I}, DType::kF64, wv);
  Tensor y = Zeros(be, {R, O}, DType::kF64), dy = MakeTensor(be, {R, O}, DType::kF64, gv);
  Tensor dx = MakeTensor(be, {R, I}, DType::kF64, dx0), dw = MakeTensor(be, {E, O, I}, DType::kF64, dw0);
  be.GroupedLinearForward(y, x, w, offsets);
  be.GroupedLinearBackward(dx, dw, dy, x, w, offsets);
  std::vector<double> y_ref(R * O, 0.0), dx_ref = dx0, dw_ref = dw0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t o = 0; o < O; ++o)
        for (int64_t i = 0; i < I; ++i) {
          y_ref[r * O + o] += xv[r * I + i] * wv[(e * O + o) * I + i];
          dx_ref[r * I + i] += gv[r * O + o] * wv[(e * O + o) * I + i];
          dw_ref[(e * O + o) * I + i] += gv[r * O + o] * xv[r * I + i];
        }
  ExpectNear(ToVector(be, y), y_ref, kTolF64, "grouped y");
  ExpectNear(ToVector(be, dx), dx_ref, kTolF64, "grouped dx (accumulated)");
  ExpectNear(ToVector(be, dw), dw_ref, kTolF64, "grouped dw (accumulated)");
}

TEST_F(CpuOpsTest, GroupedLinearGradients) {
  const int64_t E = 3, R = 9, I = 4, O = 5;
  Tensor offsets = MakeIndex(be, {E + 1}, {0, 4, 4, 9});
  Tensor x = RandomTensor(be, {R, I}, DType::kF64, 20), w = RandomTensor(be, {E, O, I}, DType::kF64, 21);
  Tensor y = Zeros(be, {R, O}, DType::kF64);
  const std::vector<double> r = RandomValues(R * O, 22);
  auto loss = [&] {
    be.GroupedLinearForward(y, x, w, offsets);
    return Dot(be, y, r);
  };
  Tensor dy = MakeTensor(be, {R, O}, DType::kF64, r);
  Tensor dx = Zeros(be, {R, I}, DType::kF64), dw = Zeros(be, {E, O, I}, DType::kF64);
  be.GroupedLinearBackward(dx, dw, dy, x, w, offsets);
  EXPECT_LT(GradCheckError(x, dx, loss), kGradTol);
  EXPECT_LT(GradCheckError(w, dw, loss), kGradTol);
}

TEST_F(CpuOpsTest, ElementwiseAddAxpyScale) {
  const int64_t n = 20000;  // several chunks
  std::vector<double> av = RandomValues(n, 1), bv = RandomValues(n, 2);
  for (DType dt : {DType::kF64, DType::kF32}) {
    const double tol = dt == DType::kF64 ? kTolF64 : kTolF32;
    Tensor a = MakeTensor(be, {n}, dt, av), b = MakeTensor(be, {n}, dt, bv), out = Zeros(be, {n}, dt);
    std::vector<double> want(n);
    be.Add(out, a, b);
    for (int64_t i = 0; i < n; ++i) want[i] = av[i] + bv[i];
    ExpectNear(ToVector(be, out), want, tol, "add");
    be.Add(a, a, b);  // aliasing a
    ExpectNear(ToVector(be, a), want, tol, "add aliased");
    be.Axpy(a, -0.5, b);
    for (int64_t i = 0; i < n; ++i) want[i] -= 0.5 * bv[i];
    ExpectNear(ToVector(be, a), want, tol, "axpy");
    be.Scale(a, 3.0);
    for (double& w : want) w *= 3.0;
    ExpectNear(ToVector(be, a), want, tol, "scale");
  }
}

TEST_F(CpuOpsTest, ConcatColsForwardBackward) {
  const int64_t N = 6, A = 3, B = 5;
  Tensor a = RandomTensor(be, {N, A}, DType::kF64, 1), b = RandomTensor(be, {N, B}, DType::kF64, 2);
  Tensor out = Zeros(be, {N, A + B}, DType::kF64);
  be.ConcatCols(out, a, b);
  const std::vector<double> av = ToVector(be, a), bv = ToVector(be, b), ov = ToVector(be, out);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < A; ++j) ASSERT_EQ(ov[n * (A + B) + j], av[n * A + j]);
    for (int64_t j = 0; j < B; ++j) ASSERT_EQ(ov[n * (A + B) + A + j], bv[n * B + j]);
  }
  const std::vector<double> r = RandomValues(N * (A + B), 3);
  auto loss = [&] {
    be.ConcatCols(out, a, b);
    return Dot(be, out, r);
  };
  Tensor dout = MakeTensor(be, {N, A + B}, DType::kF64, r);
  Tensor da = Zeros(be, {N, A}, DType::kF64), db = Zeros(be, {N, B}, DType::kF64);
  be.ConcatColsBackward(da, db, dout);
  EXPECT_LT(GradCheckError(a, da, loss), kGradTol);
  EXPECT_LT(GradCheckError(b, db, loss), kGradTol);
}

// ---- normalisation and activations ----------------------------------------------

TEST_F(CpuOpsTest, RmsNormMatchesNaiveAndGradients) {
  const int64_t N = 5, C = 70;  // C spans two dw column tiles
  const double eps = 1e-6;
  Tensor x = RandomTensor(be, {N, C}, DType::kF64, 1), w = RandomTensor(be, {C}, DType::kF64, 2);
  Tensor y = Zeros(be, {N, C}, DType::kF64), rstd = Zeros(be, {N}, DType::kF64);
  be.RmsNormForward(y, rstd, x, w, eps);
  const std::vector<double> xv = ToVector(be, x), wv = ToVector(be, w);
  std::vector<double> want(N * C);
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0.0;
    for (int64_t j = 0; j < C; ++j) ss += xv[n * C + j] * xv[n * C + j];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    EXPECT_NEAR(ToVector(be, rstd)[n], r, 1e-12);
    for (int64_t j = 0; j < C; ++j) want[n * C + j] = xv[n * C + j] * r * wv[j];
  }
  ExpectNear(ToVector(be, y), want, kTolF64, "rmsnorm");

  const std::vector<double> r = RandomValues(N * C, 3);
  auto loss = [&] {
    be.RmsNormForward(y, rstd, x, w, eps);
    return Dot(be, y, r);
  };
  loss();
  Tensor dy = MakeTensor(be, {N, C}, DType::kF64, r);
  Tensor dx = Zeros(be, {N, C}, DType::kF64), dw = Zeros(be, {C}, DType::kF64);
  be.RmsNormBackward(dx, dw, dy, x, w, rstd);
  EXPECT_LT(GradCheckError(x, dx, loss), kGradTol);
  EXPECT_LT(GradCheckError(w, dw, loss), kGradTol);
}

TEST_F(CpuOpsTest, SwiGluMatchesNaiveAndGradients) {
  const int64_t N = 4, F = 6;
  Tensor gu = RandomTensor(be, {N, 2 * F}, DType::kF64, 1, 2.0);
  Tensor y = Zeros(be, {N, F}, DType::kF64);
  be.SwiGluForward(y, gu);
  const std::vector<double> g = ToVector(be, gu);
  std::vector<double> want(N * F);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < F; ++j) {
      const double a = g[n * 2 * F + j], u = g[n * 2 * F + F + j];
      want[n * F + j] = a / (1.0 + std::exp(-a)) * u;
    }
  ExpectNear(ToVector(be, y), want, kTolF64, "swiglu");
  const std::vector<double> r = RandomValues(N * F, 2);
  auto loss = [&] {
    be.SwiGluForward(y, gu);
    return Dot(be, y, r);
  };
  Tensor dy = MakeTensor(be, {N, F}, DType::kF64, r), dgu = Zeros(be, {N, 2 * F}, DType::kF64);
  be.SwiGluBackward(dgu, dy, gu);
  EXPECT_LT(GradCheckError(gu, dgu, loss), kGradTol);
}

TEST_F(CpuOpsTest, SigmoidMatchesNaiveAndGradients) {
  // Includes large |x|, where a naive exp(-x) would overflow.
  Tensor x = MakeTensor(be, {6}, DType::kF64, {-800.0, -3.0, -0.1, 0.0, 2.5, 800.0});
  Tensor y = Zeros(be, {6}, DType::kF64);
  be.SigmoidForward(y, x);
  const std::vector<double> yv = ToVector(be, y);
  EXPECT_EQ(yv[0], 0.0);
  EXPECT_EQ(yv[3], 0.5);
  EXPECT_EQ(yv[5], 1.0);
  EXPECT_NEAR(yv[1], 1.0 / (1.0 + std::exp(3.0)), 1e-15);
  EXPECT_NEAR(yv[4], 1.0 / (1.0 + std::exp(-2.5)), 1e-15);

  Tensor z = RandomTensor(be, {3, 7}, DType::kF64, 4, 2.0), s = Zeros(be, {3, 7}, DType::kF64);
  const std::vector<double> r = RandomValues(21, 5);
  auto loss = [&] {
    be.SigmoidForward(s, z);
    return Dot(be, s, r);
  };
  loss();
  Tensor ds = MakeTensor(be, {3, 7}, DType::kF64, r), dz = Zeros(be, {3, 7}, DType::kF64);
  be.SigmoidBackward(dz, ds, s);
  EXPECT_LT(GradCheckError(z, dz, loss), kGradTol);
}

// ---- embedding and loss ---------------------------------------------------------

TEST_F(CpuOpsTest, EmbeddingMatchesNaiveAndGradients) {
  const int64_t V = 5, D = 70, N = 8;
  const std::vector<int32_t> tok = {3, 0, 3, 4, 1, 3, 0, 2};  // repeats accumulate
  Tensor tokens = MakeIndex(be, {N}, tok);
  Tensor table = RandomTensor(be, {V, D}, DType::kF64, 1), out = Zeros(be, {N, D}, DType::kF64);
  be.EmbeddingForward(out, tokens, table);
  const std::vector<double> tv = ToVector(be, table), ov = ToVector(be, out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < D; ++j) ASSERT_EQ(ov[n * D + j], tv[tok[n] * D + j]);

  const std::vector<double> r = RandomValues(N * D, 2), d0 = RandomValues(V * D, 3);
  Tensor dout = MakeTensor(be, {N, D}, DType::kF64, r), dtable = MakeTensor(be, {V, D}, DType::kF64, d0);
  be.EmbeddingBackward(dtable, dout, tokens);
  std::vector<double> want = d0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < D; ++j) want[tok[n] * D + j] += r[n * D + j];
  ExpectNear(ToVector(be, dtable), want, kTolF64, "embedding backward (accumulated)");

  Tensor fresh = Zeros(be, {V, D}, DType::kF64);
  be.EmbeddingBackward(fresh, dout, tokens);
  auto loss = [&] {
    be.EmbeddingForward(out, tokens, table);
    return Dot(be, out, r);
  };
  // The loss is linear in the table, so a large step has no truncation error
  // and keeps the round-off of the 560-term sum far below the tolerance.
  EXPECT_LT(GradCheckError(table, fresh, loss, 400, 1e-3), kGradTol);
}

TEST_F(CpuOpsTest, CrossEntropyMatchesNaiveAndGradients) {
  const int64_t N = 4, V = 9;
  const std::vector<int32_t> tgt = {2, -1, 8, 0};  // row 1 is ignored
  Tensor targets = MakeIndex(be, {N}, tgt);
  // Large logits: a naive exp would overflow; the stable form must not.
  std::vector<double> lv = RandomValues(N * V, 1, 3.0);
  lv[0] += 1000.0;
  Tensor logits = MakeTensor(be, {N, V}, DType::kF64, lv), losses = Zeros(be, {N}, DType::kF64);
  be.CrossEntropyForward(losses, logits, targets);
  const std::vector<double> got = ToVector(be, losses);
  for (int64_t n = 0; n < N; ++n) {
    if (tgt[n] < 0) {
      EXPECT_EQ(got[n], 0.0);
      continue;
    }
    double mx = -INFINITY, s = 0.0;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, lv[n * V + j]);
    for (int64_t j = 0; j < V; ++j) s += std::exp(lv[n * V + j] - mx);
    EXPECT_NEAR(got[n], mx + std::log(s) - lv[n * V + tgt[n]], 1e-12);
  }

  // Gradients on moderate logits: with the +1000 row, the other entries'
  // softmax is exp(-1000) = 0 and a finite difference there is pure noise.
  const double dloss = 0.37;
  logits = MakeTensor(be, {N, V}, DType::kF64, RandomValues(N * V, 2, 2.0));
  auto loss = [&] {
    be.CrossEntropyForward(losses, logits, targets);
    return Dot(be, losses, std::vector<double>(N, dloss));  // dloss scales every token
  };
  Tensor dlogits = MakeTensor(be, {N, V}, DType::kF64, std::vector<double>(N * V, 5.0));  // overwritten
  be.CrossEntropyBackward(dlogits, logits, targets, dloss);
  const std::vector<double> dv = ToVector(be, dlogits);
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(dv[1 * V + j], 0.0) << "ignored row";
  // eps 1e-4: softmax entries near 1e-4 make the default step's round-off
  // (~1e-10 absolute) show up at ~1e-6 relative; the truncation error of the
  // larger step is ~eps^2 = 1e-8.
  EXPECT_LT(GradCheckError(logits, dlogits, loss, 64, 1e-4), kGradTol);

  // In place (dlogits aliases logits) gives the same bits.
  Tensor inplace = MakeTensor(be, {N, V}, DType::kF64, ToVector(be, logits));
  be.CrossEntropyBackward(inplace, inplace, targets, dloss);
  EXPECT_TRUE(BitwiseEqual(be, inplace, dlogits));
}

// ---- reductions and AdamW -----------------------------------------------------------

TEST_F(CpuOpsTest, SumAndSumSquaresMatchNaive) {
  const int64_t n = 30001;
  const std::vector<double> v = RandomValues(n, 9);
  double s = 0.0, ss = 0.0;
  for (double x : v) s += x, ss += x * x;
  Tensor t = MakeTensor(be, {n}, DType::kF64, v);
  EXPECT_NEAR(be.Sum(t), s, 1e-9);
  EXPECT_NEAR(be.SumSquares(t), ss, 1e-9 * ss);
  Tensor f = MakeTensor(be, {n}, DType::kF32, v);
  double sf = 0.0;
  for (double x : ToVector(be, f)) sf += x;
  EXPECT_NEAR(be.Sum(f), sf, 1e-9);  // F32 inputs, double accumulation
}

TEST_F(CpuOpsTest, AdamWMatchesHandComputedStep) {
  // step 2, grad_scale 0.5. Element 0: p=1, g=0.2, m=0.1, v=0.01 ->
  //   g'=0.1, m=0.1, v=0.01, mhat=0.1/0.19, vhat=0.01/0.0975,
  //   p = 1 - 0.01 (mhat/(sqrt(vhat)+1e-8) + 0.1*1) = 0.9825657952542147.
  // Element 1: p=-2, g=-4, m=v=0 -> m=-0.2, v=0.2, p=-1.9906504000282794.
  AdamWParams hp;
  hp.lr = 0.01;
  hp.beta1 = 0.9;
  hp.beta2 = 0.95;
  hp.eps = 1e-8;
  hp.weight_decay = 0.1;
  hp.step = 2;
  hp.grad_scale = 0.5;
  Tensor p = MakeTensor(be, {2}, DType::kF64, {1.0, -2.0}), g = MakeTensor(be, {2}, DType::kF64, {0.2, -4.0});
  Tensor m = MakeTensor(be, {2}, DType::kF64, {0.1, 0.0}), v = MakeTensor(be, {2}, DType::kF64, {0.01, 0.0});
  be.AdamWStep(p, g, m, v, hp);
  const std::vector<double> pv = ToVector(be, p), mv = ToVector(be, m), vv = ToVector(be, v);
  EXPECT_NEAR(pv[0], 0.9825657952542147, 1e-14);
  EXPECT_NEAR(pv[1], -1.9906504000282794, 1e-14);
  EXPECT_NEAR(mv[0], 0.1, 1e-15);
  EXPECT_NEAR(vv[0], 0.01, 1e-15);
  EXPECT_NEAR(mv[1], -0.2, 1e-15);
  EXPECT_NEAR(vv[1], 0.2, 1e-15);
}

// ---- determinism -------------------------------------------------------------------

// Runs `op` (which writes `out`) with 1 and with 3 OpenMP threads on
// identical inputs and requires the same bits.
template <typename Setup, typename Op>
void ExpectThreadInvariant(Backend& be, Setup setup, Op op, const char* what) {
  omp_set_num_threads(1);
  Tensor one = setup();
  op(one);
  omp_set_num_threads(3);
  Tensor three = setup();
  op(three);
  omp_set_num_threads(2);
  EXPECT_TRUE(BitwiseEqual(be, one, three)) << what;
}

TEST_F(CpuOpsTest, ResultsAreBitwiseIndependentOfThreadCount) {
  const DType f = DType::kF32;
  // Matmul: row tiles (M=515), column tiles (N=1031), and the 131 x 67 case.
  const int64_t shapes[][3] = {{131, 67, 50}, {515, 300, 129}, {37, 1031, 77}};
  for (auto& s : shapes) {
    const int64_t M = s[0], N = s[1], K = s[2];
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      Tensor a = RandomTensor(be, ta ? std::vector<int64_t>{K, M} : std::vector<int64_t>{M, K}, f, 1);
      Tensor b = RandomTensor(be, tb ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N}, f, 2);
      ExpectThreadInvariant(
          be, [&] { return RandomTensor(be, {M, N}, f, 3); },
          [&](Tensor& c) { be.Matmul(c, a, b, ta, tb, 1.0, 1.0); }, "matmul");
    }
  }
  // RmsNormBackward: dw sums over 131 rows, 333 columns (ragged column tile).
  {
    const int64_t N = 131, C = 333;
    Tensor x = RandomTensor(be, {N, C}, f, 4), w = RandomTensor(be, {C}, f, 5), dy = RandomTensor(be, {N, C}, f, 6);
    Tensor y = Zeros(be, {N, C}, f), rstd = Zeros(be, {N}, f);
    be.RmsNormForward(y, rstd, x, w, 1e-6);
    Tensor dx1 = Zeros(be, {N, C}, f), dx3 = Zeros(be, {N, C}, f);
    int calls = 0;
    ExpectThreadInvariant(
        be, [&] { return Zeros(be, {C}, f); },
        [&](Tensor& dw) { be.RmsNormBackward(calls++ == 0 ? dx1 : dx3, dw, dy, x, w, rstd); }, "rmsnorm dw");
    EXPECT_TRUE(BitwiseEqual(be, dx1, dx3)) << "rmsnorm dx";
  }
  // EmbeddingBackward: 5000 tokens onto 50 rows (many repeats), D = 200.
  {
    const int64_t V = 50, D = 200, N = 5000;
    std::vector<int32_t> tok(N);
    for (int64_t n = 0; n < N; ++n) tok[n] = static_cast<int32_t>((n * 7919) % V);
    Tensor tokens = MakeIndex(be, {N}, tok);
    Tensor dy = RandomTensor(be, {N, D}, f, 7);
    ExpectThreadInvariant(
        be, [&] { return Zeros(be, {V, D}, f); }, [&](Tensor& dt) { be.EmbeddingBackward(dt, dy, tokens); },
        "embedding");
  }
  // SumSquares over many chunks.
  {
    Tensor x = RandomTensor(be, {100003}, f, 8);
    omp_set_num_threads(1);
    const double one = be.SumSquares(x);
    omp_set_num_threads(3);
    const double three = be.SumSquares(x);
    omp_set_num_threads(2);
    EXPECT_EQ(std::memcmp(&one, &three, sizeof one), 0) << one << " vs " << three;
  }
}

}  // namespace
}  // namespace troupe
