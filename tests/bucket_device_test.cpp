// BucketOptimizer's device path (the one NCCL drives on GPUs) against its
// host path: packing with local duplicates summed, all-reduce or ZeRO-1's
// uneven reduce-scatter and all-gather, unpacking into every copy. Here the
// device communicator is a CPU stand-in over two threads (tests/
// thread_comm.h) that sums in rank order, as the host ring does for two ranks, so both paths must give the
// same bits: gradients after the reduction, weights after the step.
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/host_io.h"
#include "gpu/model/params.h"
#include "test_util.h"
#include "thread_comm.h"
#include "train/parallel/bucket_optimizer.h"
#include "train/parallel/collectives.h"
#include "train/parallel/device_comms.h"

namespace troupe {
namespace {

struct Outcome {
  std::vector<std::vector<double>> grads, weights;  // rank 0's first copy, by tensor
  int device_calls = 0;
};

// Rank 0 holds the model twice (a local duplicate, as DualPipe's rank does),
// rank 1 once; every tensor is in one bucket held by both.
std::vector<Outcome> RunBoth(bool device, bool zero1) {
  ModelConfig cfg = testing::TinyMoeModel();
  auto groups = parallel::CreateLocalGroup(2);
  auto board = std::make_shared<testing::ThreadCommBoard>(2);
  std::vector<Outcome> out(2);
  auto rank_main = [&](int r) {
    CpuBackend be(1);
    const int copies = r == 0 ? 2 : 1;
    std::vector<ModelParams> params, grads;
    for (int c = 0; c < copies; ++c) {
      params.push_back(std::move(AllocateParams(be, cfg, DType::kF32).value()));
      grads.push_back(std::move(AllocateParams(be, cfg, DType::kF32).value()));
      ASSERT_TRUE(InitParams(be, cfg, 5, params.back()).ok());
      std::mt19937 rng(100 * r + c);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (ParamRef& g : ListParams(grads.back())) {
        std::vector<float> v(static_cast<size_t>(g.tensor->numel()));
        for (float& x : v) x = normal(rng);
        FromHostFloats(be, *g.tensor, v);
      }
    }
    parallel::Bucket bucket{{0, 1}, {}};
    for (ParamRef& p : ListParams(params[0]))
      if (p.trainable) bucket.names.push_back(p.name);
    std::vector<ModelParams*> p_sets, g_sets;
    for (int c = 0; c < copies; ++c) {
      p_sets.push_back(&params[c]);
      g_sets.push_back(&grads[c]);
    }
    std::map<parallel::DeviceGroup, std::unique_ptr<DeviceComm>> comms;
    comms.emplace(parallel::DeviceGroup{{0, 1}}, std::make_unique<testing::ThreadComm>(board, r, 2));
    auto device_comms = parallel::DeviceComms::Of(std::move(comms));
    auto opt = parallel::BucketOptimizer::Create(be, *groups[r], {bucket}, p_sets, g_sets, zero1, 10000,
                                                 device ? device_comms.get() : nullptr);
    ASSERT_TRUE(opt.ok()) << opt.status().message();
    ASSERT_TRUE((*opt)->ReduceGradients().ok());
    TrainConfig tc;
    ASSERT_TRUE((*opt)->Step(tc, 1e-2, 1.0, 1).ok());
    for (ParamRef& g : ListParams(grads[0]))
      if (g.trainable) out[r].grads.push_back(testing::ToVector(be, *g.tensor));
    for (ParamRef& p : ListParams(params[0]))
      if (p.trainable) out[r].weights.push_back(testing::ToVector(be, *p.tensor));
    if (copies == 2) {  // the duplicate's weights are the same bits
      std::vector<ParamRef> a = ListParams(params[0]), b = ListParams(params[1]);
      for (size_t i = 0; i < a.size(); ++i) {
        if (a[i].trainable)
          EXPECT_EQ(testing::ToVector(be, *a[i].tensor), testing::ToVector(be, *b[i].tensor)) << a[i].name;
      }
    }
  };
  std::thread t1(rank_main, 1);
  rank_main(0);
  t1.join();
  out[0].device_calls = out[1].device_calls = board->reductions / 2;
  return out;
}

class BucketDevicePath : public ::testing::TestWithParam<bool> {};

TEST_P(BucketDevicePath, GivesTheHostPathsGradientsAndWeights) {
  const bool zero1 = GetParam();
  const std::vector<Outcome> host = RunBoth(false, zero1), device = RunBoth(true, zero1);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(host[r].device_calls, 0);
    EXPECT_EQ(device[r].device_calls, 1) << "one reduction of the one bucket";
    ASSERT_EQ(device[r].weights.size(), host[r].weights.size());
    for (size_t i = 0; i < host[r].weights.size(); ++i) {
      EXPECT_EQ(device[r].weights[i], host[r].weights[i]) << "rank " << r << " weight " << i;
      if (!zero1) EXPECT_EQ(device[r].grads[i], host[r].grads[i]) << "rank " << r << " gradient " << i;
    }
  }
  // Every rank ends with the same weights.
  EXPECT_EQ(device[0].weights, device[1].weights);
}

INSTANTIATE_TEST_SUITE_P(Zero1, BucketDevicePath, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "zero1" : "plain"; });

}  // namespace
}  // namespace troupe
