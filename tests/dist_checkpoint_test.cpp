// Checkpoints of distributed runs (train/parallel/dist_checkpoint.h): a
// checkpoint saved in one layout resumes in another (or in a single-process
// Trainer, and the other way round) and the run goes on as if it had never
// stopped; the same layout resumes bit for bit; a damaged shard is read from
// its replica; a rank that cannot write makes the save fail without a
// commit; a bad --resume is one clear error on every rank. Ranks run as
// threads over the in-process group (the CLI test runs real processes).
#include "train/parallel/dist_checkpoint.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "gpu/cpu/cpu_backend.h"
#include "small_job.h"
#include "test_util.h"
#include "train/checkpointer.h"
#include "train/parallel/tags.h"
#include "train/trainer.h"

namespace troupe {
namespace {

namespace fs = std::filesystem;
using parallel::DistCheckpointer;
using parallel::DistributedTrainer;

JobConfig CheckpointJob(const fs::path& dir) {
  JobConfig j = testing::SmallPipelineJob(dir);
  j.train.steps = 4;
  return j;
}

// A layout: pp = 0 means the single-process Trainer.
struct Shape {
  int pp = 0, ep = 1, dp = 1;
  const char* schedule = "1f1b";
  bool zero1 = true;
  std::string Name() const {
    if (pp == 0) return "single";
    return "pp" + std::to_string(pp) + "_ep" + std::to_string(ep) + "_dp" + std::to_string(dp) + "_" + schedule +
           (zero1 ? "_zero1" : "");
  }
};

struct Outcome {
  std::vector<double> losses;          // rank 0's, one per step run here
  std::vector<std::string> errors;     // per rank ("" = fine)
  std::vector<SaveResult> saves;       // rank 0's finished saves
  std::vector<ckpt::ReadStats> reads;  // per rank, of the resume
};

struct RunSpec {
  std::string dir;          // checkpoint folder
  CheckpointConfig config;  // every = steps between saves (0 = none)
  std::string resume;       // "" = start fresh
  int until_step = 4;       // train until this step
};

Outcome RunSingle(const JobConfig& job, const RunSpec& spec) {
  Outcome out;
  out.errors.assign(1, "");
  out.reads.resize(1);
  CpuBackend be(1);
  auto t = Trainer::Create(be, job);
  if (!t.ok()) {
    out.errors[0] = t.status().message();
    return out;
  }
  std::unique_ptr<AsyncCheckpointer> ckpt;
  if (spec.config.every > 0 || !spec.resume.empty()) {
    auto c = AsyncCheckpointer::Open(spec.dir, spec.config);
    if (!c.ok()) {
      out.errors[0] = c.status().message();
      return out;
    }
    ckpt = std::move(c).value();
  }
  if (!spec.resume.empty()) {
    auto m = spec.resume == "latest" ? ckpt->catalog().Latest() : ckpt->catalog().Get(spec.resume);
    if (!m.ok()) {
      out.errors[0] = m.status().message();
      return out;
    }
    ReadableStores readable = OpenStoresFor(spec.dir, *m, ckpt->stores(), &out.reads[0]);
    auto snap = ckpt::LoadCheckpoint(*m, readable.stores, &out.reads[0]);
    Status st = snap.ok() ? (*t)->Restore(*snap) : snap.status();
    if (!st.ok()) {
      out.errors[0] = st.message();
      return out;
    }
  }
  while ((*t)->step() < spec.until_step) {
    auto r = (*t)->Step();
    if (!r.ok()) {
      out.errors[0] = r.status().message();
      return out;
    }
    out.losses.push_back(r->loss.total);
    if (ckpt && spec.config.every > 0 && r->step % spec.config.every == 0) {
      if (auto done = ckpt->WaitIdle()) out.saves.push_back(std::move(*done));
      auto snap = (*t)->Capture({{"loss", r->loss.total}});
      if (snap.ok()) ckpt->Submit(std::move(snap).value());
    }
  }
  if (ckpt)
    if (auto done = ckpt->WaitIdle()) out.saves.push_back(std::move(*done));
  return out;
}

Outcome RunDistributed(JobConfig job, const Shape& shape, const RunSpec& spec) {
  job.parallel.pp = shape.pp;
  job.parallel.ep = shape.ep;
  job.parallel.dp = shape.dp;
  job.parallel.schedule = shape.schedule;
  job.parallel.zero1 = shape.zero1;
  const int world = shape.pp * shape.ep * shape.dp;
  Outcome out;
  out.errors.assign(world, "");
  out.reads.resize(world);
  auto layout = parallel::PlanLayout(job.model, job.train, job.parallel, world);
  if (!layout.ok()) {
    out.errors[0] = layout.status().message();
    return out;
  }
  auto group = parallel::CreateLocalGroup(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      auto fail = [&](const Status& s) {
        out.errors[r] = s.message();
        group[r]->Abort("rank " + std::to_string(r) + " failed");
      };
      CpuBackend be(1);
      auto t = DistributedTrainer::Create(be, job, *layout, *group[r], 20000);
      if (!t.ok()) return fail(t.status());
      std::unique_ptr<DistCheckpointer> ckpt;
      if (spec.config.every > 0 || !spec.resume.empty()) {
        auto c = DistCheckpointer::Open(spec.dir, spec.config, *group[r], 20000);
        if (!c.ok()) return fail(c.status());
        ckpt = std::move(c).value();
      }
      if (!spec.resume.empty()) {
        auto m = ckpt->Resume(spec.resume, **t, &out.reads[r]);
        if (!m.ok()) return fail(m.status());
      }
      auto collect = [&](std::optional<SaveResult> done) {
        if (done && r == 0) out.saves.push_back(std::move(*done));
      };
      while ((*t)->step() < spec.until_step) {
        auto rep = (*t)->Step();
        if (!rep.ok()) return fail(rep.status());
        if (r == 0) out.losses.push_back(rep->loss.total);
        if (ckpt && spec.config.every > 0 && rep->step % spec.config.every == 0) {
          collect(ckpt->WaitIdle());
          std::string skipped;
          Status st = ckpt->Save(**t, {{"loss", rep->loss.total}}, &skipped);
          if (!st.ok()) return fail(st);
          if (!skipped.empty()) return fail(Status::IOError("save skipped: " + skipped));
        }
      }
      if (ckpt) collect(ckpt->WaitIdle());
    });
  }
  for (auto& th : threads) th.join();
  return out;
}

Outcome RunJob(const JobConfig& job, const Shape& shape, const RunSpec& spec) {
  return shape.pp == 0 ? RunSingle(job, spec) : RunDistributed(job, shape, spec);
}

void ExpectNoErrors(const Outcome& o, const std::string& what) {
  for (size_t r = 0; r < o.errors.size(); ++r) EXPECT_EQ(o.errors[r], "") << what << ": rank " << r;
  for (const SaveResult& s : o.saves) EXPECT_TRUE(s.status.ok()) << what << ": " << s.status.message();
}

struct LayoutPair {
  Shape saved, resumed;
};

void PrintTo(const LayoutPair& p, std::ostream* os) { *os << p.saved.Name() << " -> " << p.resumed.Name(); }

class ResumeInAnotherLayout : public ::testing::TestWithParam<LayoutPair> {};

// Steps 3 and 4 after a resume at step 2 have the losses of the run that
// never stopped: to the last bit in the same layout, to fp32 reordering
// (1e-5 relative, as tests/dist_trainer_test.cpp) in another.
TEST_P(ResumeInAnotherLayout, ContinuesTheRunThatNeverStopped) {
  const LayoutPair p = GetParam();
  testing::TempDir dir;
  const JobConfig job = CheckpointJob(dir.path());
  const Outcome straight = RunJob(job, p.resumed, {(dir.path() / "none").string(), {}, "", 4});
  ExpectNoErrors(straight, "straight run");
  ASSERT_EQ(straight.losses.size(), 4u);

  RunSpec save{(dir.path() / "ckpt").string(), {}, "", 2};
  save.config.every = 2;
  const Outcome first = RunJob(job, p.saved, save);
  ExpectNoErrors(first, "saving run");
  ASSERT_EQ(first.saves.size(), 1u);
  const ckpt::Manifest& m = first.saves[0].manifest;
  EXPECT_EQ(m.step, 2);
  if (p.saved.pp > 0) {
    EXPECT_EQ(m.layout.pp, p.saved.pp);
    EXPECT_EQ(m.layout.ep, p.saved.ep);
    EXPECT_EQ(m.layout.dp, p.saved.dp);
  }
  EXPECT_EQ(m.tensors.size(), DistributedTrainer::CheckpointTensorNames(job.model).size());

  const Outcome second = RunJob(job, p.resumed, {save.dir, {}, "latest", 4});
  ExpectNoErrors(second, "resumed run");
  ASSERT_EQ(second.losses.size(), 2u);
  const bool same = p.saved.Name() == p.resumed.Name();
  for (int s = 0; s < 2; ++s) {
    if (same) {
      EXPECT_EQ(second.losses[s], straight.losses[2 + s]) << "step " << s + 3 << ": a same-layout resume is bitwise";
    } else {
      EXPECT_NEAR(second.losses[s], straight.losses[2 + s], 1e-5 * std::abs(straight.losses[2 + s]))
          << "step " << s + 3;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ResumeInAnotherLayout,
                         ::testing::Values(LayoutPair{{2, 2, 1, "dualpipe"}, {2, 2, 1, "dualpipe"}},
                                           LayoutPair{{2, 1, 2, "1f1b", false}, {2, 1, 2, "1f1b", false}},
                                           LayoutPair{{2, 2, 1, "dualpipe"}, {1, 1, 2, "1f1b"}},
                                           LayoutPair{{1, 2, 2, "1f1b"}, {}}, LayoutPair{{}, {2, 1, 2, "1f1b"}},
                                           LayoutPair{{4, 1, 1, "1f1b", false}, {2, 2, 1, "dualpipev"}},
                                           LayoutPair{{2, 1, 2, "zb1p"}, {1, 2, 1, "1f1b", false}}),
                         [](const ::testing::TestParamInfo<LayoutPair>& info) {
                           return info.param.saved.Name() + "_to_" + info.param.resumed.Name();
                         });

// Two ranks, two copies of every piece: a flipped byte in rank 0's store is
// caught by its checksum and the copy in rank 1's store serves instead.
TEST(DistCheckpoint, DamagedShardIsReadFromItsReplica) {
  testing::TempDir dir;
  const JobConfig job = CheckpointJob(dir.path());
  const Shape shape{1, 1, 2, "1f1b"};
  RunSpec save{(dir.path() / "ckpt").string(), {}, "", 2};
  save.config.every = 2;
  save.config.replication = 2;
  const Outcome first = RunJob(job, shape, save);
  ExpectNoErrors(first, "saving run");
  ASSERT_EQ(first.saves.size(), 1u);
  const ckpt::Manifest m = first.saves[0].manifest;
  EXPECT_EQ(m.replication, 2);
  const ckpt::TensorRecord* embed = m.Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  ASSERT_EQ(embed->shards.size(), 1u);
  EXPECT_EQ(embed->shards[0].stores, (std::vector<std::string>{"local-0", "local-1"}));
  {
    auto store = ckpt::ShardStore::Open(LocalStoreDir(save.dir, 0), LocalStoreId(0));
    ASSERT_TRUE(store.ok()) << store.status().message();
    ASSERT_TRUE((*store)->CorruptForTest({m.id, embed->name, 0}).ok());
  }
  const Outcome straight = RunJob(job, shape, {(dir.path() / "none").string(), {}, "", 4});
  const Outcome second = RunJob(job, shape, {save.dir, {}, m.id, 4});
  ExpectNoErrors(second, "resumed run");
  int fallbacks = 0;
  for (const ckpt::ReadStats& s : second.reads) fallbacks += s.replica_fallbacks;
  EXPECT_GE(fallbacks, 2) << "both ranks read the embedding; each must have fallen back to store local-1";
  ASSERT_EQ(second.losses.size(), 2u);
  EXPECT_EQ(second.losses[0], straight.losses[2]);
  EXPECT_EQ(second.losses[1], straight.losses[3]);
}

// Rank 1 cannot open its store (a file sits where its folder belongs): the
// save is reported failed naming rank 1 and nothing is committed; once the
// obstacle is gone the next save commits, and only it is listed.
TEST(DistCheckpoint, RankThatCannotWriteCommitsNothing) {
  testing::TempDir dir;
  const JobConfig job = CheckpointJob(dir.path());
  RunSpec save{(dir.path() / "ckpt").string(), {}, "", 2};
  save.config.every = 2;
  fs::create_directories(save.dir);
  std::ofstream(LocalStoreDir(save.dir, 1)) << "not a store";
  const Outcome first = RunJob(job, {1, 1, 2, "1f1b"}, save);
  ASSERT_EQ(first.saves.size(), 1u);
  EXPECT_FALSE(first.saves[0].status.ok());
  EXPECT_NE(first.saves[0].status.message().find("rank 1"), std::string::npos) << first.saves[0].status.message();
  {
    auto folder = OpenCheckpointFolder(save.dir);
    ASSERT_TRUE(folder.ok()) << folder.status().message();
    auto listed = folder->catalog->List();
    ASSERT_TRUE(listed.ok());
    EXPECT_TRUE(listed->empty()) << "a save a rank could not write was committed";
  }
  fs::remove(LocalStoreDir(save.dir, 1));
  const Outcome second = RunJob(job, {1, 1, 2, "1f1b"}, save);
  ExpectNoErrors(second, "second saving run");
  auto folder = OpenCheckpointFolder(save.dir);
  ASSERT_TRUE(folder.ok()) << folder.status().message();
  auto listed = folder->catalog->List();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].id, "ckpt-000002") << "ids are never reused";
  std::vector<std::string> problems;
  EXPECT_TRUE(ckpt::VerifyCheckpoint((*listed)[0], folder->store_set, &problems).ok());
  // The failed save's pieces on rank 0 were garbage the second save dropped.
  for (auto& store : folder->stores)
    for (const std::string& id : store->Checkpoints()) EXPECT_EQ(id, "ckpt-000002") << "in " << store->id();
}

// Every rank fails with the same clear error; a checkpoint of another
// model is refused before anything changes.
TEST(DistCheckpoint, BadResumeIsOneClearErrorOnEveryRank) {
  testing::TempDir dir;
  const JobConfig job = CheckpointJob(dir.path());
  RunSpec save{(dir.path() / "ckpt").string(), {}, "", 2};
  save.config.every = 2;
  ExpectNoErrors(RunJob(job, {2, 1, 1, "1f1b"}, save), "saving run");

  const Outcome unknown = RunJob(job, {2, 1, 1, "1f1b"}, {save.dir, {}, "ckpt-000042", 4});
  for (const std::string& e : unknown.errors) EXPECT_NE(e.find("ckpt-000042"), std::string::npos) << e;

  JobConfig other = job;
  other.model.num_hidden_layers = 3;
  const Outcome mismatch = RunJob(other, {1, 1, 2, "1f1b"}, {save.dir, {}, "latest", 4});
  for (const std::string& e : mismatch.errors) EXPECT_NE(e.find("tensors"), std::string::npos) << e;
  JobConfig reseeded = job;
  reseeded.train.seed += 1;
  const Outcome seed = RunJob(reseeded, {1, 1, 2, "1f1b"}, {save.dir, {}, "latest", 4});
  for (const std::string& e : seed.errors) EXPECT_NE(e.find("train.seed"), std::string::npos) << e;
}

// Malformed checkpoint messages from a peer (a save order, a resume order, a
// rank's report) are a clear error naming the message and the sender, and
// nothing is committed. Rank 0 here plays the peer of the checkpointer
// under test by hand.
TEST(DistCheckpoint, MalformedMessagesAreClearErrorsAndCommitNothing) {
  testing::TempDir dir;
  JobConfig job = CheckpointJob(dir.path());
  job.parallel.dp = 2;
  job.parallel.zero1 = false;  // rank 0 captures alone: no moment gather
  auto layout = parallel::PlanLayout(job.model, job.train, job.parallel, 2);
  ASSERT_TRUE(layout.ok()) << layout.status().message();
  auto group = parallel::CreateLocalGroup(2);
  const std::string ckpt_dir = (dir.path() / "ckpt").string();
  CheckpointConfig config;
  config.every = 1;
  config.replication = 1;
  const std::vector<uint8_t> garbage = {0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
  auto tag = [](parallel::CheckpointMessage m) { return parallel::Tag(parallel::TagKind::kCheckpoint, m); };

  // Both trainers first: making one is collective (the ranks check they run one job).
  CpuBackend be0(1), be1(1);
  Expected<std::unique_ptr<DistributedTrainer>> rank0 = Status::Internal("not made");
  std::thread make0([&] { rank0 = DistributedTrainer::Create(be0, job, *layout, *group[0], 2000); });
  auto rank1 = DistributedTrainer::Create(be1, job, *layout, *group[1], 2000);
  make0.join();
  ASSERT_TRUE(rank1.ok()) << rank1.status().message();
  ASSERT_TRUE(rank0.ok()) << rank0.status().message();
  auto ckpt1 = DistCheckpointer::Open(ckpt_dir, config, *group[1], 2000);
  ASSERT_TRUE(ckpt1.ok()) << ckpt1.status().message();
  ASSERT_TRUE(group[0]->Send(1, tag(parallel::kCkptResume), garbage).ok());
  auto resumed = (*ckpt1)->Resume("latest", **rank1, nullptr);
  EXPECT_FALSE(resumed.ok());
  EXPECT_NE(resumed.status().message().find("resume order from rank 0"), std::string::npos)
      << resumed.status().message();
  ASSERT_TRUE(group[0]->Send(1, tag(parallel::kCkptOrder), garbage).ok());
  std::string skipped;
  Status saved = (*ckpt1)->Save(**rank1, {}, &skipped);
  EXPECT_FALSE(saved.ok());
  EXPECT_NE(saved.message().find("checkpoint order from rank 0"), std::string::npos) << saved.message();

  auto ckpt0 = DistCheckpointer::Open(ckpt_dir, config, *group[0], 2000);
  ASSERT_TRUE(ckpt0.ok()) << ckpt0.status().message();
  ASSERT_TRUE(group[1]->Send(0, tag(parallel::kCkptReport), garbage).ok());
  ASSERT_TRUE((*ckpt0)->Save(**rank0, {}, &skipped).ok());
  EXPECT_EQ(skipped, "");
  auto result = (*ckpt0)->WaitIdle();
  ASSERT_TRUE(result.has_value());
  EXPECT_FALSE(result->status.ok());
  EXPECT_NE(result->status.message().find("checkpoint report from rank 1"), std::string::npos)
      << result->status.message();
  ckpt0->reset();
  auto folder = OpenCheckpointFolder(ckpt_dir, /*read_only=*/true);
  ASSERT_TRUE(folder.ok()) << folder.status().message();
  auto listed = folder->catalog->List();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty()) << "a save with a malformed report was committed";
}

}  // namespace
}  // namespace troupe
