// Resuming training from a checkpoint: a run saved at step k, restored into
// a fresh process-like Trainer and continued, must produce bitwise the same
// losses and final state as the run that never stopped (also when the data
// loader wraps an epoch). Restore refuses what does not fit and then leaves
// the trainer as it was. AsyncCheckpointer: saves on its thread, retention,
// the folder tools open afterwards.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "data/shards.h"
#include "gpu/cpu/cpu_backend.h"
#include "small_job.h"
#include "storage/checkpoint/checkpoint_io.h"
#include "train/checkpointer.h"
#include "train/trainer.h"

namespace troupe {
namespace {

namespace fs = std::filesystem;

::testing::AssertionResult SameBits(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << a.size() << " vs " << b.size() << " losses";
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(double)) != 0)
      return ::testing::AssertionFailure()
             << "step " << i + 1 << ": " << a[i] << " vs " << b[i] << " (diff " << a[i] - b[i] << ")";
  }
  return ::testing::AssertionSuccess();
}

// Every tensor, the step and the loader positions are bitwise equal.
::testing::AssertionResult SameState(const ckpt::Snapshot& a, const ckpt::Snapshot& b) {
  if (a.step != b.step) return ::testing::AssertionFailure() << "step " << a.step << " vs " << b.step;
  if (a.loaders != b.loaders) return ::testing::AssertionFailure() << "loader positions differ";
  if (a.tensors.size() != b.tensors.size()) return ::testing::AssertionFailure() << "tensor counts differ";
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    if (a.tensors[i].name != b.tensors[i].name || a.tensors[i].shape != b.tensors[i].shape ||
        !std::ranges::equal(a.tensors[i].data(), b.tensors[i].data()))
      return ::testing::AssertionFailure() << "tensor " << a.tensors[i].name << " differs";
  }
  return ::testing::AssertionSuccess();
}

struct Storage {
  std::unique_ptr<ckpt::Catalog> catalog;
  std::vector<std::unique_ptr<ckpt::ShardStore>> stores;
  ckpt::StoreSet set;
};

Storage OpenStorage(const fs::path& dir) {
  Storage s;
  auto c = ckpt::Catalog::Open(dir.string());
  EXPECT_TRUE(c.ok()) << c.status().message();
  if (!c.ok()) return s;
  s.catalog = std::move(c).value();
  for (int i = 0; i < 3; ++i) {
    auto st = ckpt::ShardStore::Open((dir / ("store-" + std::to_string(i))).string(), "n" + std::to_string(i));
    EXPECT_TRUE(st.ok()) << st.status().message();
    if (!st.ok()) return s;
    s.set[(*st)->id()] = st->get();
    s.stores.push_back(std::move(st).value());
  }
  return s;
}

class ResumeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("troupe_resume_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "_" +
            std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  JobConfig SmallJob(int train_tokens = 4000) {
    JobConfig j = testing::SmallJob(dir_, train_tokens);
    j.toml_text = "# the small test job\n";
    return j;
  }

  static std::unique_ptr<Trainer> Make(Backend& be, const JobConfig& job) {
    auto t = Trainer::Create(be, job);
    EXPECT_TRUE(t.ok()) << t.status().message();
    return t.ok() ? std::move(t).value() : nullptr;
  }

  // Runs `steps` steps, appending each loss.total.
  static void Train(Trainer& t, int steps, std::vector<double>& losses) {
    for (int i = 0; i < steps; ++i) {
      auto r = t.Step();
      ASSERT_TRUE(r.ok()) << r.status().message();
      losses.push_back(r->loss.total);
    }
  }

  static ckpt::Snapshot Cap(const Trainer& t) {
    auto s = t.Capture({{"loss", 1.0}});
    EXPECT_TRUE(s.ok()) << s.status().message();
    return s.ok() ? std::move(s).value() : ckpt::Snapshot{};
  }

  // Trains `total` steps straight, and separately `at` steps, saves, restores
  // into a fresh backend and trainer, and trains the rest: the same losses and
  // final state, bit for bit. Returns the snapshot the resume started from.
  ckpt::Snapshot ExpectExactResume(const JobConfig& job, int at, int total) {
    std::vector<double> straight;
    ckpt::Snapshot straight_end;
    {
      CpuBackend be(2);
      auto tr = Make(be, job);
      if (!tr) return {};
      Train(*tr, total, straight);
      straight_end = Cap(*tr);
    }
    std::vector<double> resumed;
    ckpt::Snapshot saved;
    {
      CpuBackend be(2);
      auto tr = Make(be, job);
      if (!tr) return {};
      Train(*tr, at, resumed);
      saved = Cap(*tr);
      EXPECT_EQ(saved.step, at);
      Storage st = OpenStorage(dir_ / "ckpt");
      if (!st.catalog || st.stores.size() != 3) return {};
      auto m = ckpt::SaveCheckpoint(saved, st.set, *st.catalog, {2, 3});
      EXPECT_TRUE(m.ok()) << m.status().message();
    }  // trainer, backend and storage gone: as if the process ended
    {
      CpuBackend be(2);
      auto tr = Make(be, job);
      if (!tr) return {};
      Storage st = OpenStorage(dir_ / "ckpt");
      if (!st.catalog || st.stores.size() != 3) return {};
      auto m = st.catalog->Latest();
      EXPECT_TRUE(m.ok()) << m.status().message();
      if (!m.ok()) return {};
      auto snap = ckpt::LoadCheckpoint(*m, st.set);
      EXPECT_TRUE(snap.ok()) << snap.status().message();
      if (!snap.ok()) return {};
      EXPECT_TRUE(SameState(*snap, saved));
      // Before the restore the fresh trainer is at step 0 and would go elsewhere.
      EXPECT_EQ(tr->step(), 0);
      Status s = tr->Restore(*snap);
      EXPECT_TRUE(s.ok()) << s.message();
      EXPECT_EQ(tr->step(), at);
      EXPECT_TRUE(SameState(Cap(*tr), saved));
      Train(*tr, total - at, resumed);
      EXPECT_TRUE(SameBits(straight, resumed));
      EXPECT_TRUE(SameState(Cap(*tr), straight_end));
    }
    return saved;
  }

  fs::path dir_;
};

TEST_F(ResumeTest, ResumedRunIsBitwiseTheStraightRun) {
  const JobConfig job = SmallJob();
  const ckpt::Snapshot saved = ExpectExactResume(job, 4, 8);
  // The snapshot holds what a resume needs.
  EXPECT_EQ(saved.seed, job.train.seed);
  EXPECT_EQ(saved.config_text, job.toml_text);
  ASSERT_EQ(saved.loaders.count("train"), 1u);
  EXPECT_EQ(saved.loaders.at("train").epoch, 0u);
  EXPECT_EQ(saved.loaders.at("train").cursor, 16u);  // 4 steps x 4 windows
  int moments = 0;
  for (const ckpt::HostTensor& h : saved.tensors) moments += h.name.starts_with("optimizer.exp_avg") ? 1 : 0;
  EXPECT_EQ(moments * 3, static_cast<int>(saved.tensors.size()) * 2);  // params, exp_avg, exp_avg_sq
}

TEST_F(ResumeTest, ResumeAcrossAnEpochBoundary) {
  // 114 tokens: (114 - 16 - 2) / 16 + 1 = 7 windows an epoch; 4 a step. After
  // 3 steps the loader stands at epoch 1, cursor 5, so the first batch after
  // the resume spans the boundary, and the 8 steps wrap four epochs.
  const JobConfig job = SmallJob(114);
  const ckpt::Snapshot saved = ExpectExactResume(job, 3, 8);
  ASSERT_EQ(saved.loaders.count("train"), 1u);
  EXPECT_EQ(saved.loaders.at("train").epoch, 1u);
  EXPECT_EQ(saved.loaders.at("train").cursor, 5u);
}

TEST_F(ResumeTest, ResumeFromEveryStep) {
  const JobConfig job = SmallJob(114);
  for (int at : {1, 2, 5, 6}) {
    SCOPED_TRACE("resumed at step " + std::to_string(at));
    fs::remove_all(dir_ / "ckpt");
    ExpectExactResume(job, at, 7);
  }
}

TEST_F(ResumeTest, RestoreRefusesWhatDoesNotFitAndChangesNothing) {
  const JobConfig job = SmallJob();
  // The reference: 3 steps straight.
  std::vector<double> ref;
  {
    CpuBackend be(2);
    auto tr = Make(be, job);
    ASSERT_TRUE(tr);
    Train(*tr, 3, ref);
  }
  // Bad snapshots to try: another model shape (trained further, so the
  // loaders and step differ too), and variants of a good snapshot.
  JobConfig other = job;
  other.model.moe_intermediate_size = 12;  // the experts' shapes change
  ckpt::Snapshot other_snap, later;
  {
    CpuBackend be(2);
    auto tr = Make(be, other);
    ASSERT_TRUE(tr);
    std::vector<double> unused;
    Train(*tr, 5, unused);
    other_snap = Cap(*tr);
  }
  {
    CpuBackend be(2);
    auto tr = Make(be, job);
    ASSERT_TRUE(tr);
    std::vector<double> unused;
    Train(*tr, 5, unused);
    later = Cap(*tr);
  }

  CpuBackend be(2);
  auto tr = Make(be, job);
  ASSERT_TRUE(tr);
  std::vector<double> losses;
  Train(*tr, 2, losses);
  const ckpt::Snapshot before = Cap(*tr);

  // The first tensor (in the trainer's order) the other model has in another shape.
  std::string first_bad;
  for (const ckpt::HostTensor& h : before.tensors) {
    auto it = std::find_if(other_snap.tensors.begin(), other_snap.tensors.end(),
                           [&](const ckpt::HostTensor& o) { return o.name == h.name; });
    if (it == other_snap.tensors.end() || it->shape != h.shape) {
      first_bad = h.name;
      break;
    }
  }
  ASSERT_FALSE(first_bad.empty());

  struct Bad {
    std::string what;
    ckpt::Snapshot snap;
    std::string needle;
  };
  std::vector<Bad> bads;
  bads.push_back({"another model shape", other_snap, first_bad});
  {
    ckpt::Snapshot s = later;  // only the last tensor is off: nothing may have been copied before the check
    s.tensors.back().shape.back() += 1;
    bads.push_back({"last tensor's shape", s, s.tensors.back().name});
  }
  {
    ckpt::Snapshot s = later;
    s.tensors.back().dtype = "BF16";
    bads.push_back({"last tensor's dtype", s, s.tensors.back().name});
  }
  {
    ckpt::Snapshot s = later;
    const std::string gone = s.tensors[3].name;
    s.tensors.erase(s.tensors.begin() + 3);
    bads.push_back({"a missing tensor", s, gone});
  }
  {
    ckpt::Snapshot s = later;
    s.tensors.push_back({"model.extra", "F32", {2}, std::vector<uint8_t>(8)});
    bads.push_back({"an extra tensor", s, "tensors"});
  }
  {
    ckpt::Snapshot s = later;
    s.loaders.erase("val");
    bads.push_back({"no val loader", s, "loader"});
  }
  {
    // The train position is valid (and differs), the val one is not: the
    // train loader must be put back as it was.
    ckpt::Snapshot s = later;
    s.loaders["val"].cursor = 1000000;
    bads.push_back({"a bad val position", s, "loader"});
  }
  {
    ckpt::Snapshot s = later;
    s.seed += 1;
    bads.push_back({"another seed", s, "seed"});
  }
  for (const Bad& b : bads) {
    SCOPED_TRACE(b.what);
    Status s = tr->Restore(b.snap);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.message();
    EXPECT_NE(s.message().find(b.needle), std::string::npos) << s.message();
    EXPECT_EQ(tr->step(), 2);
    EXPECT_TRUE(SameState(Cap(*tr), before));
  }
  // And the next step is the one the run would have taken anyway.
  Train(*tr, 1, losses);
  EXPECT_TRUE(SameBits(losses, ref));
}

TEST_F(ResumeTest, AsyncCheckpointerSavesRetainsAndResumes) {
  const JobConfig job = SmallJob();
  const std::string dir = (dir_ / "ckpt").string();
  CheckpointConfig cc;
  cc.every = 1;
  cc.keep_last = 2;
  cc.replication = 2;
  cc.stores = 2;
  cc.shards_per_tensor = 2;

  // A bad config is refused before anything runs.
  CheckpointConfig bad = cc;
  bad.replication = 3;
  auto refused = AsyncCheckpointer::Open(dir, bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(refused.status().IsInvalidArgument()) << refused.status().message();
  EXPECT_NE(refused.status().message().find("replication"), std::string::npos);
  EXPECT_TRUE(OpenCheckpointFolder((dir_ / "nothing").string()).status().IsNotFound());

  // Garbage of a save that crashed earlier (shards, no manifest) is dropped on open.
  {
    auto cat = ckpt::Catalog::Open(dir);
    ASSERT_TRUE(cat.ok());
    const std::string id = (*cat)->ReserveId().value();
    auto st = ckpt::ShardStore::Open(dir + "/store-1", "local-1");
    ASSERT_TRUE(st.ok());
    ASSERT_TRUE((*st)->Put({id, "w", 0}, 1, std::vector<uint8_t>(64, 7)).ok());
    ASSERT_EQ((*st)->Checkpoints().size(), 1u);
  }

  std::vector<double> straight;
  {
    CpuBackend be(2);
    auto tr = Make(be, job);
    ASSERT_TRUE(tr);
    Train(*tr, 5, straight);
  }

  std::vector<std::string> ids;
  std::vector<std::vector<std::string>> dropped;
  {
    auto opened = AsyncCheckpointer::Open(dir, cc);
    ASSERT_TRUE(opened.ok()) << opened.status().message();
    AsyncCheckpointer& ck = **opened;
    EXPECT_EQ(ck.stores().size(), 2u);
    for (const auto& [sid, store] : ck.stores()) EXPECT_TRUE(store->Checkpoints().empty()) << sid;
    EXPECT_FALSE(ck.WaitIdle().has_value());
    EXPECT_FALSE(ck.Poll().has_value());

    CpuBackend be(2);
    auto tr = Make(be, job);
    ASSERT_TRUE(tr);
    std::vector<double> losses;
    for (int step = 1; step <= 4; ++step) {
      Train(*tr, 1, losses);
      auto prev = ck.WaitIdle();
      EXPECT_EQ(prev.has_value(), false) << "every result was collected";
      ck.Submit(Cap(*tr));
      std::optional<SaveResult> r;
      if (step % 2 == 1) {
        // Poll while "training goes on".
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (!(r = ck.Poll()) && std::chrono::steady_clock::now() < deadline)
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
      } else {
        r = ck.WaitIdle();
      }
      ASSERT_TRUE(r.has_value()) << "step " << step;
      ASSERT_TRUE(r->status.ok()) << r->status.message();
      EXPECT_EQ(r->manifest.step, step);
      EXPECT_EQ(r->manifest.replication, 2);
      EXPECT_GT(r->write_seconds, 0.0);
      auto listed = ck.catalog().Get(r->manifest.id);
      ASSERT_TRUE(listed.ok()) << listed.status().message();
      EXPECT_TRUE(*listed == r->manifest);
      ids.push_back(r->manifest.id);
      dropped.push_back(r->dropped);
    }
    // Retention keep_last = 2: each save from the third on drops the oldest.
    EXPECT_TRUE(dropped[0].empty());
    EXPECT_TRUE(dropped[1].empty());
    EXPECT_EQ(dropped[2], std::vector<std::string>{ids[0]});
    EXPECT_EQ(dropped[3], std::vector<std::string>{ids[1]});
    auto list = ck.catalog().List();
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->size(), 2u);
    EXPECT_EQ((*list)[0].id, ids[2]);
    EXPECT_EQ((*list)[1].id, ids[3]);
    for (const auto& [sid, store] : ck.stores())
      EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{ids[2], ids[3]})) << sid;

    // Two saves handed over back to back: neither is lost.
    Train(*tr, 1, losses);
    ck.Submit(Cap(*tr));
    ck.Submit(Cap(*tr));
    auto last = ck.WaitIdle();
    ASSERT_TRUE(last.has_value());
    EXPECT_TRUE(last->status.ok()) << last->status.message();
    auto after = ck.catalog().List();
    ASSERT_TRUE(after.ok());
    ASSERT_EQ(after->size(), 2u);
    EXPECT_EQ((*after)[0].step, 5);
    EXPECT_EQ((*after)[1].step, 5);
    EXPECT_EQ((*after)[1].id, last->manifest.id);
    ids.push_back((*after)[0].id);
    ids.push_back((*after)[1].id);
    EXPECT_TRUE(SameBits(losses, straight));
  }  // the destructor waits for the save in flight

  // A tool opens the folder afterwards and resumes from the step-4 checkpoint.
  auto folder = OpenCheckpointFolder(dir);
  ASSERT_TRUE(folder.ok()) << folder.status().message();
  EXPECT_EQ(folder->stores.size(), 2u);
  EXPECT_EQ(folder->store_set.count("local-0") + folder->store_set.count("local-1"), 2u);
  auto list = folder->catalog->List();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  auto m = folder->catalog->Latest();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->id, ids.back());
  ckpt::ReadStats stats;
  std::vector<std::string> problems;
  EXPECT_TRUE(ckpt::VerifyCheckpoint(*m, folder->store_set, &problems).ok());
  EXPECT_TRUE(problems.empty());
  auto snap = ckpt::LoadCheckpoint(*m, folder->store_set, &stats);
  ASSERT_TRUE(snap.ok()) << snap.status().message();
  EXPECT_EQ(snap->step, 5);
  EXPECT_EQ(snap->metrics.at("loss"), 1.0);
  CpuBackend be(2);
  auto tr = Make(be, job);
  ASSERT_TRUE(tr);
  ASSERT_TRUE(tr->Restore(*snap).ok());
  std::vector<double> more;
  Train(*tr, 1, more);
  // The straight run's 6th step.
  std::vector<double> six;
  {
    CpuBackend be6(2);
    auto t6 = Make(be6, job);
    ASSERT_TRUE(t6);
    Train(*t6, 6, six);
  }
  ASSERT_EQ(more.size(), 1u);
  EXPECT_EQ(std::memcmp(&more[0], &six[5], sizeof(double)), 0) << more[0] << " vs " << six[5];
}

}  // namespace
}  // namespace troupe
