// Membership rules, the job tracker and the durable state store, without
// actors or sockets: a fake clock drives failure detection.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>

#include "coordinator/job_record.h"
#include "coordinator/membership.h"
#include "coordinator/state_store.h"

namespace troupe::cluster {
namespace {

using namespace std::chrono_literals;

struct FakeClock {
  Clock::time_point t{std::chrono::seconds(1000)};
  ClockFn fn() {
    return [this] { return t; };
  }
};

NodeSpec Spec(const std::string& name, uint64_t incarnation = 1) {
  NodeSpec s;
  s.name = name;
  s.host = "localhost";
  s.devices = {{"cpu", "cpu slot 0", 0}};
  s.memory_bytes = 1 << 30;
  s.capacity = 1;
  s.incarnation = incarnation;
  return s;
}

TEST(Membership, JoinAssignsIdsAndBumpsEpoch) {
  FakeClock c;
  Membership m({}, c.fn());
  EXPECT_EQ(m.epoch(), 0u);
  auto a = m.Join(Spec("node1"));
  auto b = m.Join(Spec("node2"));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->node_id, "n1");
  EXPECT_EQ(b->node_id, "n2");
  EXPECT_EQ(b->epoch, 2u);
  EXPECT_FALSE(a->rejoined);
  EXPECT_EQ(m.CountInState(NodeState::kAlive), 2u);
  EXPECT_TRUE(m.CanTakeWork("n1"));
  EXPECT_FALSE(m.Join(Spec("")).ok());
}

TEST(Membership, AnImpossibleCapacityIsRefused) {
  FakeClock c;
  Membership m({}, c.fn());
  NodeSpec huge = Spec("node1");
  huge.capacity = 1 << 30;  // would make the planner loop and place ranks on workers the node lacks
  auto r = m.Join(huge);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("capacity 1073741824 is not 0..1024"), std::string::npos) << r.status().message();
  huge.capacity = -1;
  EXPECT_FALSE(m.Join(huge).ok());
  huge.capacity = 1024;
  EXPECT_TRUE(m.Join(huge).ok());
}

TEST(Membership, HeartbeatsKeepANodeAliveAndSilenceKillsIt) {
  FakeClock c;
  Membership m({500ms, 3000ms}, c.fn());
  ASSERT_TRUE(m.Join(Spec("node1")).ok());
  ASSERT_TRUE(m.Join(Spec("node2")).ok());
  for (int i = 0; i < 10; ++i) {  // 5 s of heartbeats from node1 only
    c.t += 500ms;
    ASSERT_TRUE(m.Heartbeat("n1", 1).ok());
    auto dead = m.DetectFailures();
    if (i < 6) {
      EXPECT_TRUE(dead.empty()) << "at " << (i + 1) * 500 << " ms";  // 3.0 s is not > 3 s
    } else if (i == 6) {
      EXPECT_EQ(dead, std::vector<std::string>{"n2"});  // 3.5 s
    }
  }
  EXPECT_EQ(m.Find("n2")->state, NodeState::kDead);
  EXPECT_EQ(m.Find("n1")->state, NodeState::kAlive);
  EXPECT_EQ(m.epoch(), 3u);  // 2 joins + 1 death
  // A dead node's heartbeat is refused: it must join again.
  EXPECT_TRUE(m.Heartbeat("n2", 1).IsNotFound());
  EXPECT_TRUE(m.Heartbeat("n9", 1).IsNotFound());
  EXPECT_TRUE(m.Heartbeat("garbage", 1).IsNotFound());
}

TEST(Membership, RejoinKeepsTheIdAndNoticesANewProcess) {
  FakeClock c;
  Membership m({}, c.fn());
  ASSERT_TRUE(m.Join(Spec("node1", 7)).ok());
  c.t += 10s;
  ASSERT_EQ(m.DetectFailures().size(), 1u);
  auto r = m.Join(Spec("node1", 8));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->node_id, "n1");
  EXPECT_TRUE(r->rejoined);
  EXPECT_TRUE(r->new_incarnation);
  EXPECT_EQ(m.Find("n1")->state, NodeState::kAlive);
  // The old process's heartbeats are refused.
  EXPECT_TRUE(m.Heartbeat("n1", 7).IsNotFound());
  EXPECT_TRUE(m.Heartbeat("n1", 8).ok());
  // Same process reconnecting (e.g. after a coordinator restart).
  auto again = m.Join(Spec("node1", 8));
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->new_incarnation);
}

TEST(Membership, ANameStaysBoundToItsKey) {
  FakeClock c;
  Membership m({}, c.fn());
  NodeSpec a = Spec("node1");
  a.public_key = "key-A";
  ASSERT_TRUE(m.Join(a).ok());
  NodeSpec b = Spec("node1", 2);
  b.public_key = "key-B";
  auto r = m.Join(b);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("belongs to another key"), std::string::npos);
  EXPECT_EQ(m.Nodes().size(), 1u);
}

TEST(Membership, DrainAndLeave) {
  FakeClock c;
  Membership m({}, c.fn());
  ASSERT_TRUE(m.Join(Spec("node1")).ok());
  const uint64_t e = m.epoch();
  ASSERT_TRUE(m.Drain("n1").ok());
  EXPECT_EQ(m.epoch(), e + 1);
  EXPECT_FALSE(m.CanTakeWork("n1"));
  ASSERT_TRUE(m.Drain("n1").ok());  // idempotent, no epoch change
  EXPECT_EQ(m.epoch(), e + 1);
  ASSERT_TRUE(m.Heartbeat("n1", 1).ok());  // a draining node still heartbeats
  ASSERT_TRUE(m.Leave("n1").ok());
  EXPECT_EQ(m.Find("n1")->state, NodeState::kLeft);
  EXPECT_EQ(m.epoch(), e + 2);
  EXPECT_TRUE(m.Drain("n1").IsInvalidArgument());
  EXPECT_TRUE(m.Drain("n5").IsNotFound());
  c.t += 1h;
  EXPECT_TRUE(m.DetectFailures().empty());  // left nodes are not "dead"
}

TEST(Membership, RestoreMarksNodesUnconfirmedUntilTheyHeartbeat) {
  FakeClock c;
  Membership m({500ms, 3000ms}, c.fn());
  ASSERT_TRUE(m.Join(Spec("node1")).ok());
  ASSERT_TRUE(m.Join(Spec("node2")).ok());
  ASSERT_TRUE(m.Join(Spec("node3")).ok());
  ASSERT_TRUE(m.Leave("n3").ok());
  MembershipSnapshot snap = m.Snapshot();

  FakeClock c2;
  Membership r = Membership::Restore(snap, {500ms, 3000ms}, c2.fn());
  EXPECT_EQ(r.epoch(), snap.epoch + 1);
  EXPECT_EQ(r.Find("n1")->state, NodeState::kUnconfirmed);
  EXPECT_EQ(r.Find("n3")->state, NodeState::kLeft);
  EXPECT_FALSE(r.CanTakeWork("n1"));
  c2.t += 1s;
  ASSERT_TRUE(r.Heartbeat("n1", 1).ok());
  EXPECT_EQ(r.Find("n1")->state, NodeState::kAlive);
  c2.t += 2500ms;  // n2 silent 3.5 s since the restart
  EXPECT_EQ(r.DetectFailures(), std::vector<std::string>{"n2"});
  auto j = r.Join(Spec("node4"));
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j->node_id, "n4");  // ids are never reused
}

TEST(JobTracker, AssignReportInterruptReassign) {
  JobRecord rec;
  rec.config_name = "tiny";
  JobTracker t(rec);
  EXPECT_TRUE(t.NeedsWorker());
  EXPECT_FALSE(t.Assign({}).has_value());
  auto s = t.Assign({{"n2", 0}, {"n3", 0}});
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->node_id, "n2");
  EXPECT_EQ(t.record().attempt, 1u);
  StepUpdate u;
  u.attempt = 1;
  u.step = 1;
  u.loss = 7.5;
  EXPECT_TRUE(t.OnReport("n2", u));
  EXPECT_FALSE(t.OnReport("n3", u));  // wrong node
  u.attempt = 9;
  EXPECT_FALSE(t.OnReport("n2", u));  // stale attempt
  EXPECT_FALSE(t.OnNodeLost("n3", "dead"));
  EXPECT_TRUE(t.OnNodeLost("n2", "dead"));
  EXPECT_EQ(t.record().state, JobState::kInterrupted);
  EXPECT_EQ(t.record().interruptions, 1);
  auto s2 = t.Assign({{"n3", 0}});
  ASSERT_TRUE(s2.has_value());
  EXPECT_EQ(t.record().attempt, 2u);
  EXPECT_EQ(t.record().step, 0);
  EXPECT_TRUE(t.record().history.empty());
  u.attempt = 2;
  u.step = 3;
  u.done = true;
  EXPECT_TRUE(t.OnReport("n3", u));
  EXPECT_EQ(t.record().state, JobState::kCompleted);
  EXPECT_TRUE(t.Stop().IsInvalidArgument());
}

class StateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("troupe_state_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(StateStoreTest, EmptyStoreLoadsNothing) {
  auto s = StateStore::Open(dir_.string());
  ASSERT_TRUE(s.ok()) << s.status().message();
  auto m = (*s)->LoadMembership();
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->has_value());
  auto j = (*s)->LoadJob();
  ASSERT_TRUE(j.ok());
  EXPECT_FALSE(j->has_value());
}

TEST_F(StateStoreTest, ReloadAfterReopenGivesTheSameState) {
  FakeClock c;
  Membership m({}, c.fn());
  NodeSpec spec = Spec("node1", 42);
  spec.devices.push_back({"cuda", "NVIDIA H100", int64_t{80} << 30});
  ASSERT_TRUE(m.Join(spec).ok());
  ASSERT_TRUE(m.Join(Spec("node2")).ok());
  ASSERT_TRUE(m.Drain("n2").ok());
  JobRecord job;
  job.config_path = "configs/tiny.toml";
  job.config_name = "tiny";
  job.toml_text = "[train]\nsteps = 3\n";
  job.state = JobState::kRunning;
  job.attempt = 2;
  job.node_id = "n1";
  job.worker = 0;
  job.step = 17;
  job.loss = 5.25;
  job.val_loss = -1;
  job.history = {{1, 7.0, 6.9, -1, 100}, {2, 6.5, 6.4, 6.6, 120}};
  {
    auto s = StateStore::Open(dir_.string());
    ASSERT_TRUE(s.ok()) << s.status().message();
    ASSERT_TRUE((*s)->SaveMembership(m.Snapshot()).ok());
    ASSERT_TRUE((*s)->SaveJob(job).ok());
  }
  auto s = StateStore::Open(dir_.string());
  ASSERT_TRUE(s.ok()) << s.status().message();
  auto snap = (*s)->LoadMembership();
  ASSERT_TRUE(snap.ok()) << snap.status().message();
  ASSERT_TRUE(snap->has_value());
  const MembershipSnapshot& ms = **snap;
  EXPECT_EQ(ms.epoch, m.epoch());
  ASSERT_EQ(ms.nodes.size(), 2u);
  EXPECT_EQ(ms.nodes[0].spec.name, "node1");
  EXPECT_EQ(ms.nodes[0].spec.incarnation, 42u);
  ASSERT_EQ(ms.nodes[0].spec.devices.size(), 2u);
  EXPECT_EQ(ms.nodes[0].spec.devices[1].memory_bytes, int64_t{80} << 30);
  EXPECT_EQ(ms.nodes[1].state, NodeState::kDraining);
  auto jr = (*s)->LoadJob();
  ASSERT_TRUE(jr.ok()) << jr.status().message();
  ASSERT_TRUE(jr->has_value());
  EXPECT_EQ((*jr)->state, JobState::kRunning);
  EXPECT_EQ((*jr)->attempt, 2u);
  EXPECT_EQ((*jr)->step, 17);
  EXPECT_EQ((*jr)->toml_text, job.toml_text);
  ASSERT_EQ((*jr)->history.size(), 2u);
  EXPECT_EQ((*jr)->history[1].val_loss, 6.6);
  // The restored membership continues the epoch.
  Membership r = Membership::Restore(ms, {}, c.fn());
  EXPECT_GT(r.epoch(), m.epoch());
}

TEST_F(StateStoreTest, DamagedOrUnknownVersionValuesAreClearErrors) {
  auto s = StateStore::Open(dir_.string());
  ASSERT_TRUE(s.ok());
  StateStore& st = **s;
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"\x01\x02garbage\xff", "not a JSON object"},
      {"", "not a JSON object"},
      {"[1,2,3]", "not a JSON object"},
      {R"({"format":"troupe.job","version":1})", "not a troupe.membership document"},
      {R"({"format":"troupe.membership","version":99,"epoch":1})", "format version 99"},
      {R"({"format":"troupe.membership","version":1,"epoch":"x","next_id":1,"nodes":[]})", "wrong type"},
      {R"({"format":"troupe.membership","version":1,"epoch":1,"next_id":1})", "lacks field 'nodes'"},
      {R"({"format":"troupe.membership","version":1,"epoch":1,"next_id":1,"nodes":[{"id":"bad"}]})", "lacks field"},
  };
  for (const auto& [value, expect] : bad) {
    ASSERT_TRUE(st.PutRaw("membership", value).ok());
    auto m = st.LoadMembership();
    ASSERT_FALSE(m.ok()) << value;
    EXPECT_TRUE(m.status().IsCorruption());
    EXPECT_NE(m.status().message().find(expect), std::string::npos) << m.status().message();
  }
  ASSERT_TRUE(st.PutRaw("job", R"({"format":"troupe.job","version":2})").ok());
  auto j = st.LoadJob();
  ASSERT_FALSE(j.ok());
  EXPECT_NE(j.status().message().find("format version 2; this troupe reads version 1"), std::string::npos)
      << j.status().message();
  ASSERT_TRUE(st.PutRaw("job", R"({"format":"troupe.job","version":1,"config_path":"a"})").ok());
  EXPECT_TRUE(st.LoadJob().status().IsCorruption());
}

TEST_F(StateStoreTest, NaNLossesSurviveTheRoundTrip) {
  JobRecord job;
  job.loss = std::numeric_limits<double>::quiet_NaN();
  auto back = StateStore::DecodeJob(StateStore::EncodeJob(job));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_TRUE(std::isnan(back->loss));
}

}  // namespace
}  // namespace troupe::cluster
