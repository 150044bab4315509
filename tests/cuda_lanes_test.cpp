// The CUDA backend's two lanes (Backend::SetCallerLane): DualPipe issues an
// F&B pair's chunks from two threads, each to a stream of its own, and
// OrderLanes forks and joins them. A lane must see what the other computed
// before the fork, the other must see its work after the join, and two
// models computing at once on two lanes must give the bits they give one
// after another. Skipped (with the reason) where no CUDA device is usable.
#include <gtest/gtest.h>

#include <random>
#include <thread>
#include <vector>

#include "gpu/cuda/cuda_info.h"
#include "gpu/host_io.h"
#include "gpu/model/model.h"
#include "test_util.h"

#if defined(TROUPE_HAVE_CUDA)
#include "gpu/cuda/cuda_backend.h"
#endif

namespace troupe {
namespace {

#if defined(TROUPE_HAVE_CUDA)

class CudaLanesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device: " << CudaDeviceSummary();
    auto be = CudaBackend::Create(0, MatmulPrecision::kFp32);
    ASSERT_TRUE(be.ok()) << be.status().message();
    be_ = std::move(be).value();
  }
  std::unique_ptr<CudaBackend> be_;
};

TEST_F(CudaLanesTest, ForkAndJoinOrderTheLanes) {
  CudaBackend& be = *be_;
  ASSERT_EQ(be.lanes(), 2);
  EXPECT_FALSE(be.SetCallerLane(2));
  CUstream_st* const lane0 = be.stream();
  CUstream_st* lane1 = nullptr;
  // 64 Mi floats: each pass takes a fraction of a millisecond, 64 of them
  // long enough for an unordered reader on the other lane to overtake them.
  const int64_t n = 64 << 20;
  auto x = be.Alloc({n / 1024, 1024}, DType::kF32, "x");
  auto one = be.Alloc({n / 1024, 1024}, DType::kF32, "one");
  auto y = be.Alloc({n / 1024, 1024}, DType::kF32, "y");
  ASSERT_TRUE(x.ok() && one.ok() && y.ok());
  FromHostFloats(be, *one, std::vector<float>(static_cast<size_t>(n), 1.0f));
  FromHostFloats(be, *y, std::vector<float>(static_cast<size_t>(n), 1.0f));
  for (int i = 0; i < 64; ++i) be.Add(*x, *x, *one);  // lane 0: x = 64
  be.OrderLanes();                                    // fork
  std::vector<float> seen;
  std::thread second([&] {
    ASSERT_TRUE(be.SetCallerLane(1));
    lane1 = be.stream();
    seen = ToHostFloats(be, *x);                      // waits for lane 1 only
    for (int i = 0; i < 64; ++i) be.Add(*y, *y, *y);  // lane 1: y = 2^64, no host wait
  });
  second.join();
  be.OrderLanes();  // join
  EXPECT_NE(lane1, lane0) << "the second thread's work went to the first lane's stream";
  EXPECT_EQ(be.stream(), lane0) << "a thread that never asked moved off lane 0";
  const std::vector<float> y_now = ToHostFloats(be, *y);
  ASSERT_EQ(seen.size(), static_cast<size_t>(n));
  EXPECT_EQ(seen.front(), 64.0f);
  EXPECT_EQ(seen.back(), 64.0f) << "lane 1 read x before lane 0's work queued ahead of the fork";
  EXPECT_EQ(y_now.back(), 18446744073709551616.0f) << "lane 0 read y before lane 1's work queued ahead of the join";
  EXPECT_TRUE(be.Synchronize().ok());
}

struct Result {
  double loss = 0;
  std::vector<std::vector<float>> grads;
};

// Two models with their own weights and tokens, as an F&B pair's two stages:
// one after another on lane 0, or at once from two threads on two lanes.
std::vector<Result> TwoModels(Backend& be, bool at_once) {
  const ModelConfig cfg = testing::SmallMoeModel();
  const int batch = 4, t = 64;
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::vector<int32_t>> tokens(2);
  for (int i = 0; i < 2; ++i) {
    auto m = Model::Create(be, cfg, DType::kF32, batch, t);
    EXPECT_TRUE(m.ok()) << m.status().message();
    EXPECT_TRUE(InitParams(be, cfg, 7 + i, (*m)->params()).ok());
    (*m)->ZeroGrads();
    models.push_back(std::move(m).value());
    std::mt19937 rng(3 + i);
    tokens[i].resize(static_cast<size_t>(batch) * (t + 2));
    for (int32_t& x : tokens[i]) x = static_cast<int32_t>(rng() % cfg.vocab_size);
  }
  std::vector<Result> out(2);
  auto run = [&](int i) {
    Model& m = *models[i];
    for (int step = 0; step < 3; ++step) {  // gradients accumulate: three passes
      auto loss = m.Forward(tokens[i].data(), LossWeights{0.3, 1e-3});
      EXPECT_TRUE(loss.ok());
      out[i].loss += loss.ok() ? loss->total : 0.0;
      m.Backward();
    }
  };
  if (at_once) {
    be.OrderLanes();
    std::thread second([&] {
      be.SetCallerLane(1);
      run(1);
    });
    run(0);
    second.join();
    be.OrderLanes();
  } else {
    run(0);
    run(1);
  }
  EXPECT_TRUE(be.Synchronize().ok());
  for (int i = 0; i < 2; ++i)
    for (ParamRef& g : ListParams(models[i]->grads()))
      if (g.trainable) out[i].grads.push_back(ToHostFloats(be, *g.tensor));
  return out;
}

TEST_F(CudaLanesTest, TwoModelsAtOnceOnTwoLanesGiveTheSerialBits) {
  const std::vector<Result> serial = TwoModels(*be_, false);
  const std::vector<Result> lanes = TwoModels(*be_, true);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(lanes[i].loss, serial[i].loss) << "model " << i;
    ASSERT_EQ(lanes[i].grads.size(), serial[i].grads.size());
    for (size_t g = 0; g < serial[i].grads.size(); ++g)
      EXPECT_EQ(lanes[i].grads[g], serial[i].grads[g]) << "model " << i << " gradient " << g;
  }
}

// The kernel timeline (CUPTI) records the kernels two lanes ran, and that
// they ran at once: with no communication kernel, nothing counts as hidden.
TEST_F(CudaLanesTest, TheKernelTimelineRecordsBothLanesKernels) {
  CudaBackend& be = *be_;
  Status on = be.StartKernelTimeline();
  if (on.code() == StatusCode::kUnimplemented) GTEST_SKIP() << on.message();
  ASSERT_TRUE(on.ok()) << on.message();
  const int64_t n = 16 << 20;
  auto x = be.Alloc({n / 1024, 1024}, DType::kF32, "x");
  auto y = be.Alloc({n / 1024, 1024}, DType::kF32, "y");
  ASSERT_TRUE(x.ok() && y.ok());
  be.Zero(*x);
  be.Zero(*y);
  ASSERT_TRUE(be.TakeKernelSpans().ok());  // what came before
  be.OrderLanes();
  std::thread second([&] {
    ASSERT_TRUE(be.SetCallerLane(1));
    for (int i = 0; i < 32; ++i) be.Add(*y, *y, *y);
  });
  for (int i = 0; i < 32; ++i) be.Add(*x, *x, *x);
  second.join();
  be.OrderLanes();
  auto spans = be.TakeKernelSpans();
  ASSERT_TRUE(spans.ok()) << spans.status().message();
  const KernelOverlap o = OverlapOf(*spans);
  EXPECT_GE(o.compute_kernels, 64);
  EXPECT_EQ(o.comm_kernels, 0);
  EXPECT_GT(o.compute_s, 0.0);
  EXPECT_EQ(o.hidden_s, 0.0);
  auto again = be.TakeKernelSpans();  // nothing ran since
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->empty());
}

#else

TEST(CudaLanesTest, NotBuilt) { GTEST_SKIP() << "no CUDA device: built without TROUPE_CUDA"; }

#endif

}  // namespace
}  // namespace troupe
