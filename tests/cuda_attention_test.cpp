// Parity tests for the CUDA attention kernels (gpu/cuda/attention.cu) against
// the CPU reference (gpu/cpu/attention.cpp): RoPE forward/backward and MLA
// attention forward (out, lse) and backward (dq, dkv, dk_rope) on random
// inputs, for odd tiny shapes up to V3 head widths and 4096-token sequences.
// Every comparison prints its max error, so a failure says by how much.
// Skipped when no CUDA device is usable.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "tests/test_util.h"

#if defined(TROUPE_HAVE_CUDA)
#include "gpu/cuda/cuda_backend.h"
#endif

namespace troupe {
namespace {

#if defined(TROUPE_HAVE_CUDA)

using testing::MakeTensor;
using testing::RandomValues;
using testing::ToVector;

// Tolerance on max|gpu - cpu| / max|cpu|. The CPU accumulates in double and
// rounds once; the GPU runs fp32 throughout (dot products of up to 192 terms,
// softmax sums and gradient sums of up to 4096 terms, expf/logf). fp32 sums
// of n terms err by ~sqrt(n) * 6e-8 typically (a few e-6 for n = 4096), so
// 1e-4 leaves ~20x headroom while any indexing or masking bug (errors of
// order 1e-2 and up) still fails.
constexpr double kAttnTol = 1e-4;
// RoPE: angles and sin/cos in double on both sides; only the F32 store rounds.
constexpr double kRopeTol = 1e-6;

struct Err {
  double max_abs = 0.0, max_ref = 0.0;
  size_t worst = 0;
  double rel() const { return max_ref > 0.0 ? max_abs / max_ref : max_abs; }
};

// Compares got - base against want - base (base: pre-filled gradient, or
// empty), so an accumulation that overwrote instead of adding shows as a big
// error. NaN counts as an infinite error.
Err Compare(const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& base = {}) {
  Err e;
  EXPECT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double b = base.empty() ? 0.0 : base[i];
    double d = std::abs((got[i] - b) - (want[i] - b));
    if (std::isnan(d)) d = INFINITY;
    if (d > e.max_abs || (std::isinf(d) && !std::isinf(e.max_abs))) {
      e.max_abs = d;
      e.worst = i;
    }
    e.max_ref = std::max(e.max_ref, std::abs(want[i] - b));
  }
  return e;
}

void Report(const std::string& test, const char* what, const Err& e, double tol) {
  std::printf("[%s] %-8s max|gpu-cpu| %.3e  max|cpu| %.3e  rel %.3e  (worst at flat index %zu)\n", test.c_str(), what,
              e.max_abs, e.max_ref, e.rel(), e.worst);
  EXPECT_LT(e.rel(), tol) << test << " " << what << ": max abs err " << e.max_abs << " at flat index " << e.worst
                          << ", max |cpu| " << e.max_ref;
}

class CudaAttentionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto be = CudaBackend::Create(0, MatmulPrecision::kFp32);
    if (!be.ok()) GTEST_SKIP() << "no CUDA device: " << be.status().message();
    gpu_ = std::move(be.value());
  }

  // A tensor holding `values` on each backend.
  std::pair<Tensor, Tensor> Pair(const std::vector<int64_t>& shape, const std::vector<double>& values,
                                 const std::string& name) {
    return {MakeTensor(cpu_, shape, DType::kF32, values, name), MakeTensor(*gpu_, shape, DType::kF32, values, name)};
  }

  void ExpectGpuOk(const std::string& where) {
    const Status st = gpu_->Synchronize();
    ASSERT_TRUE(st.ok()) << where << ": " << st.message();
  }

  CpuBackend cpu_;
  std::unique_ptr<CudaBackend> gpu_;
};

// ---- RoPE ---------------------------------------------------------------------------

struct RopeCase {
  const char* name;
  std::vector<int64_t> shape;  // (N, H, Dh) or (N, Dh)
  int rot_offset, rot_dim, seq_len;
};

TEST_F(CudaAttentionTest, RopeMatchesCpu) {
  const RopeCase cases[] = {
      {"q_rot", {2 * 4100, 3, 24}, 8, 16, 4100},  // positions past 4096, rotary part after the content
      {"k_rope_2d", {2 * 257, 16}, 0, 16, 257},   // [N, dr]: one head
      {"odd_offset", {3 * 7, 2, 7}, 3, 4, 7},     // odd row width and offset
  };
  uint64_t seed = 100;
  for (const RopeCase& c : cases) {
    int64_t n = 1;
    for (int64_t d : c.shape) n *= d;
    const std::vector<double> x = RandomValues(static_cast<size_t>(n), seed++);
    for (bool forward : {true, false}) {
      auto [xc, xg] = Pair(c.shape, x, "x");
      if (forward) {
        cpu_.RopeForward(xc, c.rot_offset, c.rot_dim, c.seq_len, 10000.0);
        gpu_->RopeForward(xg, c.rot_offset, c.rot_dim, c.seq_len, 10000.0);
      } else {
        cpu_.RopeBackward(xc, c.rot_offset, c.rot_dim, c.seq_len, 10000.0);
        gpu_->RopeBackward(xg, c.rot_offset, c.rot_dim, c.seq_len, 10000.0);
      }
      ExpectGpuOk(c.name);
      Report(std::string("rope ") + c.name, forward ? "fwd" : "bwd", Compare(ToVector(*gpu_, xg), ToVector(cpu_, xc)),
             kRopeTol);
    }
  }
}

TEST_F(CudaAttentionTest, RopeBackwardInvertsForward) {
  const std::vector<double> x = RandomValues(4 * 64 * 2 * 32, 7);
  Tensor t = MakeTensor(*gpu_, {4 * 64, 2, 32}, DType::kF32, x);
  gpu_->RopeForward(t, 0, 32, 64, 10000.0);
  gpu_->RopeBackward(t, 0, 32, 64, 10000.0);
  ExpectGpuOk("rope roundtrip");
  Report("rope roundtrip", "x", Compare(ToVector(*gpu_, t), x), kRopeTol);
}

// ---- MLA attention ------------------------------------------------------------------

struct AttnCase {
  const char* name;
  int64_t B, T, H, dh, dr, dv;
  double q_std = 1.0;      // larger: peakier softmax, more online rescaling
  bool k_rope_3d = false;  // k_rope as [N, 1, dr] instead of [N, dr]
  int64_t N() const { return B * T; }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(dh + dr)); }
};

void PrintTo(const AttnCase& c, std::ostream* os) { *os << c.name; }

class MlaParity : public CudaAttentionTest, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(MlaParity, ForwardAndBackwardMatchCpu) {
  const AttnCase c = GetParam();
  const int64_t N = c.N(), qs = c.dh + c.dr, kvs = c.dh + c.dv;
  const std::vector<int64_t> q_shape{N, c.H, qs}, kv_shape{N, c.H, kvs}, o_shape{N, c.H, c.dv}, l_shape{N, c.H};
  const std::vector<int64_t> kr_shape = c.k_rope_3d ? std::vector<int64_t>{N, 1, c.dr} : std::vector<int64_t>{N, c.dr};
  const int T = static_cast<int>(c.T), dh = static_cast<int>(c.dh);

  auto [q_c, q_g] = Pair(q_shape, RandomValues(N * c.H * qs, 1, c.q_std), "q");
  auto [kv_c, kv_g] = Pair(kv_shape, RandomValues(N * c.H * kvs, 2), "kv");
  auto [kr_c, kr_g] = Pair(kr_shape, RandomValues(N * c.dr, 3), "k_rope");
  auto [dout_c, dout_g] = Pair(o_shape, RandomValues(N * c.H * c.dv, 4), "dout");

  // Forward: out and lse start as garbage (NaN-free) to show they are overwritten.
  auto [out_c, out_g] = Pair(o_shape, RandomValues(N * c.H * c.dv, 5), "out");
  auto [lse_c, lse_g] = Pair(l_shape, RandomValues(N * c.H, 6), "lse");
  cpu_.MlaAttentionForward(out_c, lse_c, q_c, kv_c, kr_c, T, dh, c.scale());
  gpu_->MlaAttentionForward(out_g, lse_g, q_g, kv_g, kr_g, T, dh, c.scale());
  ExpectGpuOk("forward");
  if (HasFatalFailure()) return;
  Report(c.name, "out", Compare(ToVector(*gpu_, out_g), ToVector(cpu_, out_c)), kAttnTol);
  Report(c.name, "lse", Compare(ToVector(*gpu_, lse_g), ToVector(cpu_, lse_c)), kAttnTol);

  // Backward into pre-filled gradients (backward ADDs): each side uses its
  // own forward results, as the model does; the increments are compared.
  const std::vector<double> dq0 = RandomValues(N * c.H * qs, 7, 0.5), dkv0 = RandomValues(N * c.H * kvs, 8, 0.5),
                            dkr0 = RandomValues(N * c.dr, 9, 0.5);
  auto [dq_c, dq_g] = Pair(q_shape, dq0, "dq");
  auto [dkv_c, dkv_g] = Pair(kv_shape, dkv0, "dkv");
  auto [dkr_c, dkr_g] = Pair(kr_shape, dkr0, "dk_rope");
  cpu_.MlaAttentionBackward(dq_c, dkv_c, dkr_c, dout_c, out_c, lse_c, q_c, kv_c, kr_c, T, dh, c.scale());
  gpu_->MlaAttentionBackward(dq_g, dkv_g, dkr_g, dout_g, out_g, lse_g, q_g, kv_g, kr_g, T, dh, c.scale());
  ExpectGpuOk("backward");
  if (HasFatalFailure()) return;
  Report(c.name, "dq", Compare(ToVector(*gpu_, dq_g), ToVector(cpu_, dq_c), dq0), kAttnTol);
  Report(c.name, "dkv", Compare(ToVector(*gpu_, dkv_g), ToVector(cpu_, dkv_c), dkv0), kAttnTol);
  Report(c.name, "dk_rope", Compare(ToVector(*gpu_, dkr_g), ToVector(cpu_, dkr_c), dkr0), kAttnTol);

  // The content and value halves of dkv separately (different kernels' columns).
  const auto dkv_gv = ToVector(*gpu_, dkv_g), dkv_cv = ToVector(cpu_, dkv_c);
  std::vector<double> g_k, c_k, b_k, g_v, c_v, b_v;
  for (int64_t r = 0; r < N * c.H; ++r)
    for (int64_t col = 0; col < kvs; ++col) {
      const size_t i = static_cast<size_t>(r * kvs + col);
      auto& g = col < c.dh ? g_k : g_v;
      auto& w = col < c.dh ? c_k : c_v;
      auto& b = col < c.dh ? b_k : b_v;
      g.push_back(dkv_gv[i]);
      w.push_back(dkv_cv[i]);
      b.push_back(dkv0[i]);
    }
  Report(c.name, "dk", Compare(g_k, c_k, b_k), kAttnTol);
  Report(c.name, "dv", Compare(g_v, c_v, b_v), kAttnTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaParity,
                         ::testing::Values(AttnCase{"tiny_odd", 2, 7, 3, 4, 2, 5},
                                           AttnCase{"medium", 2, 257, 4, 32, 16, 32},
                                           AttnCase{"medium_peaky", 2, 257, 4, 32, 16, 32, 4.0},  // scores up to ~+-30
                                           AttnCase{"odd_widths", 3, 100, 2, 13, 6, 47},  // widths not multiples of 16
                                           AttnCase{"v3_heads", 1, 512, 2, 128, 64, 128, 1.0, true},
                                           AttnCase{"long_seq", 1, 4096, 1, 32, 16, 32}),
                         [](const ::testing::TestParamInfo<AttnCase>& info) { return std::string(info.param.name); });

// Two identical backward calls give bitwise identical gradients (no atomics).
TEST_F(CudaAttentionTest, BackwardIsDeterministic) {
  const AttnCase c{"det", 2, 200, 3, 32, 16, 48};
  const int64_t N = c.N(), qs = c.dh + c.dr, kvs = c.dh + c.dv;
  Tensor q = MakeTensor(*gpu_, {N, c.H, qs}, DType::kF32, RandomValues(N * c.H * qs, 11));
  Tensor kv = MakeTensor(*gpu_, {N, c.H, kvs}, DType::kF32, RandomValues(N * c.H * kvs, 12));
  Tensor kr = MakeTensor(*gpu_, {N, c.dr}, DType::kF32, RandomValues(N * c.dr, 13));
  Tensor dout = MakeTensor(*gpu_, {N, c.H, c.dv}, DType::kF32, RandomValues(N * c.H * c.dv, 14));
  Tensor out = gpu_->Alloc({N, c.H, c.dv}, DType::kF32, "out").value();
  Tensor lse = gpu_->Alloc({N, c.H}, DType::kF32, "lse").value();
  gpu_->MlaAttentionForward(out, lse, q, kv, kr, static_cast<int>(c.T), static_cast<int>(c.dh), c.scale());
  std::vector<std::vector<double>> runs[2];
  for (auto& run : runs) {
    Tensor dq = gpu_->Alloc({N, c.H, qs}, DType::kF32, "dq").value();
    Tensor dkv = gpu_->Alloc({N, c.H, kvs}, DType::kF32, "dkv").value();
    Tensor dkr = gpu_->Alloc({N, c.dr}, DType::kF32, "dkr").value();
    gpu_->MlaAttentionBackward(dq, dkv, dkr, dout, out, lse, q, kv, kr, static_cast<int>(c.T), static_cast<int>(c.dh),
                               c.scale());
    ExpectGpuOk("backward");
    if (HasFatalFailure()) return;
    run = {ToVector(*gpu_, dq), ToVector(*gpu_, dkv), ToVector(*gpu_, dkr)};
  }
  const char* names[3] = {"dq", "dkv", "dk_rope"};
  for (int i = 0; i < 3; ++i) {
    size_t differ = 0;
    for (size_t k = 0; k < runs[0][i].size(); ++k) differ += runs[0][i][k] != runs[1][i][k];
    EXPECT_EQ(differ, 0u) << names[i] << ": " << differ << " of " << runs[0][i].size() << " values differ between runs";
  }
}

// Head widths beyond the kernels' limits are reported, not computed wrongly.
TEST_F(CudaAttentionTest, UnsupportedWidthIsAnError) {
  const int64_t N = 16, H = 1, dh = 300, dr = 8, dv = 8;
  Tensor q = gpu_->Alloc({N, H, dh + dr}, DType::kF32, "q").value();
  Tensor kv = gpu_->Alloc({N, H, dh + dv}, DType::kF32, "kv").value();
  Tensor kr = gpu_->Alloc({N, dr}, DType::kF32, "kr").value();
  Tensor out = gpu_->Alloc({N, H, dv}, DType::kF32, "out").value();
  Tensor lse = gpu_->Alloc({N, H}, DType::kF32, "lse").value();
  gpu_->MlaAttentionForward(out, lse, q, kv, kr, 16, static_cast<int>(dh), 0.1);
  const Status st = gpu_->Synchronize();
  EXPECT_FALSE(st.ok());
  std::printf("expected error: %s\n", st.message().c_str());
}

#else  // !TROUPE_HAVE_CUDA

TEST(CudaAttentionTest, Skipped) { GTEST_SKIP() << "no CUDA device: built without the CUDA backend"; }

#endif

}  // namespace
}  // namespace troupe
