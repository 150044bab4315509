// The training loop: bitwise determinism across thread counts, the seed's
// role, the learning-rate schedules, and that training learns.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "data/shards.h"
#include "gpu/cpu/cpu_backend.h"
#include "small_job.h"
#include "train/lr_schedule.h"
#include "train/trainer.h"

namespace troupe {
namespace {

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("troupe_trainer_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  JobConfig SmallJob() { return testing::SmallJob(dir_); }

  std::vector<double> Losses(const JobConfig& job, int threads, int steps) {
    CpuBackend be(threads);
    auto trainer = Trainer::Create(be, job);
    EXPECT_TRUE(trainer.ok()) << trainer.status().message();
    std::vector<double> out;
    for (int i = 0; i < steps; ++i) {
      auto r = (*trainer)->Step();
      EXPECT_TRUE(r.ok());
      out.push_back(r->loss.total);
    }
    auto val = (*trainer)->Evaluate();
    EXPECT_TRUE(val.ok());
    out.push_back(*val);
    return out;
  }

  std::filesystem::path dir_;
};

TEST_F(TrainerTest, LossSequenceIsBitwiseIdenticalForAnyThreadCount) {
  const JobConfig job = SmallJob();
  const std::vector<double> one = Losses(job, 1, 8);
  const std::vector<double> two = Losses(job, 2, 8);
  const std::vector<double> three = Losses(job, 3, 8);
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(0, std::memcmp(one.data(), two.data(), one.size() * sizeof(double)));
  EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(double)));
}

TEST_F(TrainerTest, TheSeedDecidesTheRun) {
  JobConfig job = SmallJob();
  const std::vector<double> a = Losses(job, 2, 3);
  job.train.seed += 1;
  const std::vector<double> b = Losses(job, 2, 3);
  EXPECT_NE(a[0], b[0]);
}

TEST_F(TrainerTest, TrainingLowersTheValidationLoss) {
  const JobConfig job = SmallJob();
  CpuBackend be(2);
  auto trainer = Trainer::Create(be, job);
  ASSERT_TRUE(trainer.ok()) << trainer.status().message();
  auto before = (*trainer)->Evaluate();
  ASSERT_TRUE(before.ok());
  EXPECT_NEAR(*before, std::log(32.0), 0.2);
  for (int i = 0; i < job.train.steps; ++i) ASSERT_TRUE((*trainer)->Step().ok());
  auto after = (*trainer)->Evaluate();
  ASSERT_TRUE(after.ok());
  // The pattern makes 3/4 of the tokens predictable; the unigram baseline is near ln(32).
  EXPECT_LT(*after, (*trainer)->unigram_baseline() - 0.5) << "before " << *before;
}

TEST_F(TrainerTest, MissingShardIsAClearError) {
  JobConfig job = SmallJob();
  job.data.train_shards = {(dir_ / "nope.bin").string()};
  CpuBackend be(1);
  auto trainer = Trainer::Create(be, job);
  ASSERT_FALSE(trainer.ok());
  EXPECT_TRUE(trainer.status().IsNotFound());
  EXPECT_NE(trainer.status().message().find("nope.bin"), std::string::npos);
}

TEST(LrSchedule, WarmupThenCosineToTheFloor) {
  TrainConfig t;
  t.lr = 1.0;
  t.warmup_steps = 10;
  t.steps = 110;
  t.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(LearningRate(t, 0), 0.1);
  EXPECT_DOUBLE_EQ(LearningRate(t, 9), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(t, 10), 1.0);
  EXPECT_NEAR(LearningRate(t, 60), 0.55, 1e-12);  // half-way: the mean of peak and floor
  EXPECT_NEAR(LearningRate(t, 110), 0.1, 1e-12);
}

TEST(LrSchedule, MultiStepDropsAt80And90Percent) {
  TrainConfig t;
  t.lr = 1.0;
  t.warmup_steps = 0;
  t.steps = 100;
  t.schedule = LrSchedule::kMultiStep;
  EXPECT_DOUBLE_EQ(LearningRate(t, 78), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(t, 80), 0.316);
  EXPECT_DOUBLE_EQ(LearningRate(t, 89), 0.316);
  EXPECT_DOUBLE_EQ(LearningRate(t, 90), 0.1);
}

}  // namespace
}  // namespace troupe
