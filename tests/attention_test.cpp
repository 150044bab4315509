// Tests for the CPU MLA attention and RoPE kernels (gpu/cpu/attention.cpp):
// a naive double-precision reference, finite-difference gradients,
// rotation properties, causality and thread-count determinism.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "tests/test_util.h"

namespace troupe {
namespace {

using testing::GradCheckError;
using testing::MakeTensor;
using testing::RandomTensor;
using testing::RandomValues;
using testing::ToVector;

// Small odd shapes so that off-by-one strides do not cancel out.
struct Shape {
  int64_t B = 2, T = 7, H = 3, dh = 4, dr = 2, dv = 5;
  int64_t N() const { return B * T; }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(dh + dr)); }
};

struct Inputs {
  Tensor q, kv, k_rope;
};

Inputs MakeInputs(Backend& be, const Shape& s, DType dt, uint64_t seed) {
  return {RandomTensor(be, {s.N(), s.H, s.dh + s.dr}, dt, seed),
          RandomTensor(be, {s.N(), s.H, s.dh + s.dv}, dt, seed + 1),
          RandomTensor(be, {s.N(), s.dr}, dt, seed + 2)};
}

Tensor Zeros(Backend& be, std::vector<int64_t> shape, DType dt) { return be.Alloc(std::move(shape), dt, "z").value(); }

struct Fwd {
  Tensor out, lse;
};

Fwd Forward(Backend& be, const Shape& s, const Inputs& in) {
  const DType dt = in.q.dtype();
  Fwd f{Zeros(be, {s.N(), s.H, s.dv}, dt), Zeros(be, {s.N(), s.H}, dt)};
  be.MlaAttentionForward(f.out, f.lse, in.q, in.kv, in.k_rope, static_cast<int>(s.T), static_cast<int>(s.dh),
                         s.scale());
  return f;
}

// The whole N x N score matrix in double, masked by "same sequence and j <= i",
// so a match also proves no attention crosses sequences.
void NaiveAttention(const Shape& s, const std::vector<double>& q, const std::vector<double>& kv,
                    const std::vector<double>& kr, std::vector<double>& out, std::vector<double>& lse) {
  const int64_t N = s.N(), qs = s.dh + s.dr, kvs = s.dh + s.dv;
  out.assign(N * s.H * s.dv, 0.0);
  lse.assign(N * s.H, 0.0);
  for (int64_t h = 0; h < s.H; ++h) {
    std::vector<double> S(N * N, -INFINITY);  // (N, N)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        if (i / s.T != j / s.T || j > i) continue;
        double dot = 0.0;
        for (int64_t c = 0; c < s.dh; ++c) dot += q[(i * s.H + h) * qs + c] * kv[(j * s.H + h) * kvs + c];
        for (int64_t c = 0; c < s.dr; ++c) dot += q[(i * s.H + h) * qs + s.dh + c] * kr[j * s.dr + c];
        S[i * N + j] = s.scale() * dot;
      }
    for (int64_t i = 0; i < N; ++i) {
      double m = -INFINITY, l = 0.0;
      for (int64_t j = 0; j < N; ++j) m = std::max(m, S[i * N + j]);
      for (int64_t j = 0; j < N; ++j) l += std::exp(S[i * N + j] - m);
      lse[i * s.H + h] = m + std::log(l);
      for (int64_t j = 0; j < N; ++j) {
        const double p = std::exp(S[i * N + j] - m) / l;
        for (int64_t c = 0; c < s.dv; ++c) out[(i * s.H + h) * s.dv + c] += p * kv[(j * s.H + h) * kvs + s.dh + c];
      }
    }
  }
}

double MaxAbsDiff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

bool BitwiseEqual(const Tensor& a, const Tensor& b) {
  return a.bytes() == b.bytes() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

// ---- (a) forward against the naive reference --------------------------------

TEST(MlaAttention, ForwardMatchesNaiveReference) {
  CpuBackend be(2);
  const Shape s;
  // F64 agrees to rounding; F32 inputs are converted exactly to double for the
  // reference, so the gap is F32 output rounding (~1e-7 relative) plus a few ulps.
  for (auto [dt, tol] : {std::pair{DType::kF64, 1e-12}, std::pair{DType::kF32, 2e-6}}) {
    Inputs in = MakeInputs(be, s, dt, 11);
    Fwd f = Forward(be, s, in);
    std::vector<double> ref_out, ref_lse;
    NaiveAttention(s, ToVector(be, in.q), ToVector(be, in.kv), ToVector(be, in.k_rope), ref_out, ref_lse);
    EXPECT_LT(MaxAbsDiff(ToVector(be, f.out), ref_out), tol) << DTypeName(dt);
    EXPECT_LT(MaxAbsDiff(ToVector(be, f.lse), ref_lse), tol) << DTypeName(dt);
  }
}

TEST(MlaAttention, FirstTokenOfEachSequenceCopiesItsValue) {
  // Row 0 of every sequence sees only itself: out = v, lse = score(0, 0).
  CpuBackend be(2);
  const Shape s;
  Inputs in = MakeInputs(be, s, DType::kF64, 21);
  Fwd f = Forward(be, s, in);
  const auto kv = ToVector(be, in.kv), out = ToVector(be, f.out);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t c = 0; c < s.dv; ++c) {
        const int64_t n = b * s.T;
        EXPECT_NEAR(out[(n * s.H + h) * s.dv + c], kv[(n * s.H + h) * (s.dh + s.dv) + s.dh + c], 1e-15);
      }
}

// ---- (b) finite-difference gradients -----------------------------------------

TEST(MlaAttention, GradientsMatchFiniteDifferences) {
  CpuBackend be(2);
  const Shape s;
  const DType dt = DType::kF64;
  Inputs in = MakeInputs(be, s, dt, 31);
  Tensor R = RandomTensor(be, {s.N(), s.H, s.dv}, dt, 34);  // loss = sum(out * R), so dout = R
  const auto r = ToVector(be, R);
  auto loss = [&]() {
    const auto out = ToVector(be, Forward(be, s, in).out);
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * r[i];
    return l;
  };
  Fwd f = Forward(be, s, in);
  Tensor dq = Zeros(be, {s.N(), s.H, s.dh + s.dr}, dt);
  Tensor dkv = Zeros(be, {s.N(), s.H, s.dh + s.dv}, dt);
  Tensor dkr = Zeros(be, {s.N(), s.dr}, dt);
  be.MlaAttentionBackward(dq, dkv, dkr, R, f.out, f.lse, in.q, in.kv, in.k_rope, static_cast<int>(s.T),
                          static_cast<int>(s.dh), s.scale());
  // Every element is checked (max_elements above numel).
  EXPECT_LT(GradCheckError(in.q, dq, loss, 1000), 1e-6);
  EXPECT_LT(GradCheckError(in.kv, dkv, loss, 1000), 1e-6);
  EXPECT_LT(GradCheckError(in.k_rope, dkr, loss, 1000), 1e-6);
}

TEST(MlaAttention, BackwardAddsIntoGradients) {
  CpuBackend be(2);
  const Shape s;
  const DType dt = DType::kF64;
  Inputs in = MakeInputs(be, s, dt, 41);
  Tensor dout = RandomTensor(be, {s.N(), s.H, s.dv}, dt, 44);
  Fwd f = Forward(be, s, in);
  auto backward = [&](double prefill) {
    Tensor dq = MakeTensor(be, {s.N(), s.H, s.dh + s.dr}, dt, std::vector<double>(in.q.numel(), prefill));
    Tensor dkv = MakeTensor(be, {s.N(), s.H, s.dh + s.dv}, dt, std::vector<double>(in.kv.numel(), prefill));
    Tensor dkr = MakeTensor(be, {s.N(), s.dr}, dt, std::vector<double>(in.k_rope.numel(), prefill));
    be.MlaAttentionBackward(dq, dkv, dkr, dout, f.out, f.lse, in.q, in.kv, in.k_rope, static_cast<int>(s.T),
                            static_cast<int>(s.dh), s.scale());
    return std::vector<std::vector<double>>{ToVector(be, dq), ToVector(be, dkv), ToVector(be, dkr)};
  };
  const auto zero = backward(0.0), one = backward(1.0);
  for (size_t t = 0; t < zero.size(); ++t)
    for (size_t i = 0; i < zero[t].size(); ++i) EXPECT_NEAR(one[t][i], zero[t][i] + 1.0, 1e-12);
}

TEST(Rope, GradientMatchesFiniteDifferences) {
  CpuBackend be(2);
  const Shape s;
  const DType dt = DType::kF64;
  const int dh = static_cast<int>(s.dh), dr = static_cast<int>(s.dr) * 2;  // 2 pairs per head
  Tensor x = RandomTensor(be, {s.N(), s.H, dh + dr}, dt, 51);
  Tensor R = RandomTensor(be, {s.N(), s.H, dh + dr}, dt, 52);
  const auto r = ToVector(be, R);
  Tensor y = Zeros(be, {s.N(), s.H, dh + dr}, dt);
  auto loss = [&]() {  // sum(RoPE(x) * R)
    be.Copy(y, x);
    be.RopeForward(y, dh, dr, static_cast<int>(s.T), 10000.0);
    const auto yv = ToVector(be, y);
    double l = 0.0;
    for (size_t i = 0; i < yv.size(); ++i) l += yv[i] * r[i];
    return l;
  };
  Tensor dx = Zeros(be, {s.N(), s.H, dh + dr}, dt);
  be.Copy(dx, R);
  be.RopeBackward(dx, dh, dr, static_cast<int>(s.T), 10000.0);
  // The loss is linear in x, so central differences have no truncation error
  // at any step; a larger step than the default 1e-6 only shrinks the
  // cancellation error (which reached 2e-6 relative on small entries).
  EXPECT_LT(GradCheckError(x, dx, loss, 1000, /*eps=*/1e-3), 1e-6);
}

// ---- (c) rotation properties -------------------------------------------------

TEST(Rope, PreservesPairNormsAndInvertsAndLeavesContentAlone) {
  CpuBackend be(2);
  const Shape s;
  const int dh = 4, dr = 6, Dh = dh + dr, T = static_cast<int>(s.T);
  Tensor x = RandomTensor(be, {s.N(), s.H, Dh}, DType::kF64, 61);
  const auto before = ToVector(be, x);
  be.RopeForward(x, dh, dr, T, 10000.0);
  const auto after = ToVector(be, x);
  for (int64_t n = 0; n < s.N(); ++n)
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t row = (n * s.H + h) * Dh;
      for (int c = 0; c < dh; ++c) EXPECT_EQ(after[row + c], before[row + c]);  // content untouched
      for (int c = dh; c < Dh; c += 2) {
        const double n0 = std::hypot(before[row + c], before[row + c + 1]);
        const double n1 = std::hypot(after[row + c], after[row + c + 1]);
        EXPECT_NEAR(n0, n1, 1e-14 * std::max(1.0, n0));
      }
      if (n % T == 0) {  // pos 0: cos 0 = 1, sin 0 = 0, exactly the identity
        for (int c = 0; c < Dh; ++c) EXPECT_EQ(after[row + c], before[row + c]);
      }
    }
  // Something moved, so the checks above are not vacuous.
  EXPECT_GT(MaxAbsDiff(before, after), 1e-3);
  be.RopeBackward(x, dh, dr, T, 10000.0);
  EXPECT_LT(MaxAbsDiff(ToVector(be, x), before), 1e-14);
}

TEST(Rope, HandComputedAngles) {
  // rot_dim 4, theta 10000: pair 0 turns by pos rad, pair 1 by pos * 10000^(-1/2) = pos / 100.
  CpuBackend be(1);
  const int T = 5;
  std::vector<double> v(2 * T * 4, 0.0);  // [N = 2T, 4], x = (1, 0) in both pairs
  for (size_t n = 0; n < 2 * T; ++n) v[n * 4 + 0] = v[n * 4 + 2] = 1.0;
  Tensor x = MakeTensor(be, {2 * T, 4}, DType::kF64, v);  // k_rope-shaped [N, dr]
  be.RopeForward(x, 0, 4, T, 10000.0);
  const auto y = ToVector(be, x);
  for (int n : {3, T + 3}) {  // pos = n % seq_len = 3 in both sequences
    EXPECT_NEAR(y[n * 4 + 0], std::cos(3.0), 1e-15);
    EXPECT_NEAR(y[n * 4 + 1], std::sin(3.0), 1e-15);
    EXPECT_NEAR(y[n * 4 + 2], std::cos(0.03), 1e-15);
    EXPECT_NEAR(y[n * 4 + 3], std::sin(0.03), 1e-15);
  }
  // [N, dr] and [N, 1, dr] are the same tensor to RopeForward.
  Tensor x3 = MakeTensor(be, {2 * T, 1, 4}, DType::kF64, v);
  be.RopeForward(x3, 0, 4, T, 10000.0);
  EXPECT_TRUE(BitwiseEqual(x, x3));
}

// ---- (d) causality -------------------------------------------------------------

TEST(MlaAttention, FutureTokensDoNotChangeEarlierOutputs) {
  CpuBackend be(2);
  const Shape s;
  const DType dt = DType::kF64;
  // Sequence 0 too: its tokens precede all of sequence 1 in row order, so a
  // mask of plain "j <= i" without sequence bounds would leak into sequence 1.
  for (int64_t b = 0; b < s.B; ++b)
  for (int64_t t = 1; t < s.T; ++t) {
    Inputs in = MakeInputs(be, s, dt, 71);
    const Fwd base = Forward(be, s, in);
    // Perturb q, kv and k_rope of token t in sequence b.
    const int64_t n = b * s.T + t;
    for (Tensor* p : {&in.q, &in.kv, &in.k_rope}) {
      const int64_t w = p->numel() / s.N();
      for (int64_t c = 0; c < w; ++c) p->data<double>()[n * w + c] += 0.5;
    }
    const Fwd moved = Forward(be, s, in);
    const auto o0 = ToVector(be, base.out), o1 = ToVector(be, moved.out);
    const auto l0 = ToVector(be, base.lse), l1 = ToVector(be, moved.lse);
    const int64_t row = s.H * s.dv;
    for (int64_t m = 0; m < s.N(); ++m) {
      const bool may_change = m >= n && m / s.T == n / s.T;
      bool same = true;
      for (int64_t c = 0; c < row; ++c) same = same && o0[m * row + c] == o1[m * row + c];
      for (int64_t h = 0; h < s.H; ++h) same = same && l0[m * s.H + h] == l1[m * s.H + h];
      EXPECT_EQ(same, !may_change) << "b=" << b << " t=" << t << " token " << m;
    }
  }
}

// ---- (e) determinism across thread counts -----------------------------------

TEST(MlaAttention, BitwiseSameForAnyThreadCount) {
  CpuBackend be(2);
  const Shape s{2, 13, 3, 4, 2, 5};  // longer rows so F32 rounding order would show
  const DType dt = DType::kF32;
  Inputs in = MakeInputs(be, s, dt, 81);
  Tensor dout = RandomTensor(be, {s.N(), s.H, s.dv}, dt, 84);
  struct Run {
    Fwd f;
    Tensor dq, dkv, dkr, rope;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Run r{Forward(be, s, in), Zeros(be, {s.N(), s.H, s.dh + s.dr}, dt), Zeros(be, {s.N(), s.H, s.dh + s.dv}, dt),
          Zeros(be, {s.N(), s.dr}, dt), Zeros(be, {s.N(), s.H, s.dh + s.dr}, dt)};
    be.MlaAttentionBackward(r.dq, r.dkv, r.dkr, dout, r.f.out, r.f.lse, in.q, in.kv, in.k_rope,
                            static_cast<int>(s.T), static_cast<int>(s.dh), s.scale());
    be.Copy(r.rope, in.q);
    be.RopeForward(r.rope, static_cast<int>(s.dh), static_cast<int>(s.dr), static_cast<int>(s.T), 10000.0);
    return r;
  };
  const Run a = run(1), b = run(3);
  omp_set_num_threads(2);
  EXPECT_TRUE(BitwiseEqual(a.f.out, b.f.out));
  EXPECT_TRUE(BitwiseEqual(a.f.lse, b.f.lse));
  EXPECT_TRUE(BitwiseEqual(a.dq, b.dq));
  EXPECT_TRUE(BitwiseEqual(a.dkv, b.dkv));
  EXPECT_TRUE(BitwiseEqual(a.dkr, b.dkr));
  EXPECT_TRUE(BitwiseEqual(a.rope, b.rope));
}

}  // namespace
}  // namespace troupe
