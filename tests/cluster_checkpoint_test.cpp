// The coordinator's checkpoint rules (CheckpointKeeper), without actors: a
// save is committed only when the writer and every replica reported their
// copy durable; a lost node or a timeout abandons it; retention drops the old.
#include <gtest/gtest.h>

#include <filesystem>

#include "coordinator/checkpoint_keeper.h"
#include "storage/checkpoint/manifest.h"

namespace troupe::cluster {
namespace {

namespace fs = std::filesystem;
using Clock = CheckpointKeeper::Clock;

class KeeperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("troupe_keeper_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<CheckpointKeeper> Open(CheckpointConfig c = {}) {
    auto k = CheckpointKeeper::Open(dir_.string(), c, std::chrono::seconds(10));
    EXPECT_TRUE(k.ok()) << k.status().message();
    return k.ok() ? std::move(k).value() : nullptr;
  }

  // The manifest a writer sends: every shard on the writer only.
  static std::string Draft(const std::string& id, int64_t step, const std::string& writer,
                           const std::string& config = "x = 1") {
    ckpt::Manifest m;
    m.id = id;
    m.step = step;
    m.config_text = config;
    m.config_hash = ckpt::ConfigHash(config);
    ckpt::TensorRecord t;
    t.name = "w";
    t.dtype = "F32";
    t.shape = {2, 2};
    t.bytes = 16;
    t.shards.push_back({0, 1, 7, {writer}});
    t.shards.push_back({1, 2, 9, {writer}});
    m.tensors.push_back(t);
    return ckpt::EncodeManifest(m);
  }

  fs::path dir_;
  const std::vector<std::string> live_{"n1", "n2", "n3"};
};

TEST_F(KeeperTest, CommitsOnlyWhenTheWriterAndEveryReplicaAreDurable) {
  auto k = Open();  // replication 0: auto, 2 with at least 2 nodes
  auto plan = k->Begin("n2", 1, 10, live_, Clock::now());
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_EQ(plan->replicas, std::vector<std::string>{"n3"});  // the next live node after the writer
  EXPECT_TRUE(k->OnDurable("n3", plan->id, "").committed == std::nullopt);  // the writer is not done
  EXPECT_TRUE(k->OnDurable("n1", plan->id, "").committed == std::nullopt);  // not a replica: ignored
  auto out = k->OnWritten("n2", plan->id, Draft(plan->id, 10, "n2"), "");
  ASSERT_TRUE(out.committed.has_value());
  EXPECT_EQ(out.committed->replication, 2);
  for (const auto& s : out.committed->tensors[0].shards) EXPECT_EQ(s.stores, (std::vector<std::string>{"n2", "n3"}));
  auto listed = k->catalog().Get(plan->id);
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(*listed, *out.committed);
  EXPECT_EQ(k->pending(), 0u);
}

TEST_F(KeeperTest, ReplicationIsRoundedDownToTheLiveNodes) {
  CheckpointConfig c;
  c.replication = 3;
  auto k = Open(c);
  auto plan = k->Begin("n1", 1, 5, {"n1", "n2"}, Clock::now());
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->replicas, std::vector<std::string>{"n2"});
  auto solo = k->Begin("n1", 1, 6, {"n1"}, Clock::now());
  ASSERT_TRUE(solo.ok());
  EXPECT_TRUE(solo->replicas.empty());
  auto out = k->OnWritten("n1", solo->id, Draft(solo->id, 6, "n1"), "");
  ASSERT_TRUE(out.committed.has_value());
  EXPECT_EQ(out.committed->replication, 1);
  // A node that may not keep data (dead, draining) gets no plan.
  auto refused = k->Begin("n9", 1, 7, live_, Clock::now());
  EXPECT_FALSE(refused.ok());
}

TEST_F(KeeperTest, ALostNodeAFailedCopyOrATimeoutAbandonsTheSave) {
  auto k = Open();
  const auto t0 = Clock::now();
  auto a = k->Begin("n1", 1, 10, live_, t0);
  auto b = k->Begin("n1", 1, 20, live_, t0);
  auto c = k->Begin("n1", 1, 30, live_, t0);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  // a: the replica dies before it synced.
  k->OnWritten("n1", a->id, Draft(a->id, 10, "n1"), "");
  auto lost = k->OnNodeLost("n2");
  ASSERT_EQ(lost.drop.size(), 3u);  // every save waiting on n2
  EXPECT_EQ(k->pending(), 0u);
  EXPECT_FALSE(k->catalog().Get(a->id).ok());
  EXPECT_TRUE(k->OnDurable("n2", a->id, "").committed == std::nullopt);  // too late
  // A replica that failed, a writer that failed, a draft that lies.
  auto d = k->Begin("n1", 1, 40, live_, t0);
  EXPECT_EQ(k->OnDurable("n2", d->id, "disk full").drop, std::vector<std::string>{d->id});
  auto e = k->Begin("n1", 1, 50, live_, t0);
  EXPECT_EQ(k->OnWritten("n1", e->id, "", "capture failed").drop, std::vector<std::string>{e->id});
  auto f = k->Begin("n1", 1, 60, live_, t0);
  EXPECT_EQ(k->OnWritten("n1", f->id, Draft(f->id, 61, "n1"), "").drop, std::vector<std::string>{f->id});
  auto g = k->Begin("n1", 1, 70, live_, t0);
  EXPECT_EQ(k->OnWritten("n1", g->id, Draft(g->id, 70, "n3"), "").drop, std::vector<std::string>{g->id});
  auto h = k->Begin("n1", 1, 80, live_, t0);
  EXPECT_EQ(k->OnWritten("n1", h->id, "{not json", "").drop, std::vector<std::string>{h->id});
  // Another node cannot answer for the writer.
  auto i = k->Begin("n1", 1, 90, live_, t0);
  EXPECT_TRUE(k->OnWritten("n3", i->id, Draft(i->id, 90, "n3"), "").drop.empty());
  EXPECT_TRUE(k->Expire(t0 + std::chrono::seconds(5)).drop.empty());
  EXPECT_EQ(k->Expire(t0 + std::chrono::seconds(11)).drop, std::vector<std::string>{i->id});
  auto listed = k->catalog().List();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
}

TEST_F(KeeperTest, RetentionDropsOldCheckpointsAndLatestMatchesTheConfig) {
  CheckpointConfig c;
  c.keep_last = 2;
  auto k = Open(c);
  std::vector<std::string> ids, dropped;
  for (int step = 100; step <= 400; step += 100) {
    auto p = k->Begin("n1", 1, step, {"n1"}, Clock::now());
    ASSERT_TRUE(p.ok());
    ids.push_back(p->id);
    auto out = k->OnWritten("n1", p->id, Draft(p->id, step, "n1", step == 400 ? "other = 2" : "x = 1"), "");
    ASSERT_TRUE(out.committed.has_value());
    dropped.insert(dropped.end(), out.drop.begin(), out.drop.end());
  }
  EXPECT_EQ(dropped, (std::vector<std::string>{ids[0], ids[1]}));
  auto latest = k->LatestFor(ckpt::ConfigHash("x = 1"));
  ASSERT_TRUE(latest.ok());
  ASSERT_TRUE(latest->has_value());
  EXPECT_EQ((*latest)->step, 300);  // step 400 was saved under another config
  auto none = k->LatestFor(ckpt::ConfigHash("y = 3"));
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  // Ids are never reused, even after a restart.
  k.reset();
  auto again = Open(c);
  auto p = again->Begin("n1", 2, 500, {"n1"}, Clock::now());
  ASSERT_TRUE(p.ok());
  EXPECT_GT(p->id, ids.back());
}

}  // namespace
}  // namespace troupe::cluster
