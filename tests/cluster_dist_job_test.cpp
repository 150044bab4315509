// Distributed jobs in the cluster, without actors or sockets: planning an
// attempt's ranks over the live workers, the coordinator's half of the
// rendezvous (hostile entries included), the tracker's rules for ranks, and
// the record's round trip through the state store.
#include <gtest/gtest.h>

#include <filesystem>

#include "actors/transport/keys.h"
#include "coordinator/dist_job.h"
#include "coordinator/job_record.h"
#include "coordinator/state_store.h"

namespace troupe::cluster {
namespace {

// 2 layers, 4 experts in 2 groups, 4 sequences a step.
JobConfig MicroJob(const std::string& parallel) {
  const std::string toml =
      "[model]\nvocab_size = 64\nhidden_size = 32\nnum_hidden_layers = 2\nfirst_k_dense_replace = 1\n"
      "num_attention_heads = 2\nq_lora_rank = 16\nkv_lora_rank = 16\nqk_nope_head_dim = 8\n"
      "qk_rope_head_dim = 4\nv_head_dim = 8\nintermediate_size = 64\nmoe_intermediate_size = 16\n"
      "n_routed_experts = 4\nn_shared_experts = 1\nnum_experts_per_tok = 2\nn_group = 2\ntopk_group = 1\n"
      "num_nextn_predict_layers = 0\n[train]\nseq_len = 16\nbatch_size = 4\nsteps = 10\n"
      "[data]\ntrain_shards = [\"t.bin\"]\nval_shards = [\"v.bin\"]\ntokenizer = \"\"\n[parallel]\n" +
      parallel;
  auto job = ParseConfigText(toml, "micro");
  EXPECT_TRUE(job.ok()) << job.status().message();
  return job.ok() ? *job : JobConfig{};
}

TEST(PlanRanks, DpZeroTakesTheReplicasThatFitAndKeepsEachOnOneNode) {
  const JobConfig job = MicroJob("pp = 2\ndp = 0\n");
  EXPECT_TRUE(IsDistributed(job.parallel));
  auto plan = PlanRanks(job, {{"n1", 2}, {"n2", 2}});
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_EQ(plan->dp, 2);
  ASSERT_EQ(plan->ranks.size(), 4u);
  // rank = (dp_rank * ep + ep_rank) * pp + pp_rank: a replica's two stages share a node.
  EXPECT_EQ(plan->ranks[0].node_id, plan->ranks[1].node_id);
  EXPECT_EQ(plan->ranks[2].node_id, plan->ranks[3].node_id);
  EXPECT_NE(plan->ranks[0].node_id, plan->ranks[2].node_id);
  EXPECT_NE(plan->explanation.find("placement of 4 ranks"), std::string::npos) << plan->explanation;

  // One node gone: one replica on the survivor's workers.
  auto shrunk = PlanRanks(job, {{"n2", 2}});
  ASSERT_TRUE(shrunk.ok()) << shrunk.status().message();
  EXPECT_EQ(shrunk->dp, 1);
  ASSERT_EQ(shrunk->ranks.size(), 2u);
  EXPECT_EQ(shrunk->ranks[0].node_id, "n2");
  EXPECT_NE(shrunk->ranks[0].worker, shrunk->ranks[1].worker);

  // Three workers: still one replica (the third stays idle).
  auto odd = PlanRanks(job, {{"n1", 1}, {"n2", 1}, {"n3", 1}});
  ASSERT_TRUE(odd.ok()) << odd.status().message();
  EXPECT_EQ(odd->ranks.size(), 2u);
}

TEST(PlanRanks, TooFewWorkersWaitAndAnImpossibleLayoutFails) {
  auto wait = PlanRanks(MicroJob("pp = 2\ndp = 0\n"), {{"n1", 1}});
  ASSERT_FALSE(wait.ok());
  EXPECT_TRUE(wait.status().IsNotFound()) << wait.status().message();
  EXPECT_NE(wait.status().message().find("needs 2 workers; the live nodes have 1"), std::string::npos)
      << wait.status().message();
  auto fixed = PlanRanks(MicroJob("pp = 2\ndp = 2\n"), {{"n1", 2}, {"n2", 1}});
  ASSERT_FALSE(fixed.ok());
  EXPECT_TRUE(fixed.status().IsNotFound()) << fixed.status().message();
  // ep = 4 does not divide n_group = 2: no number of workers helps.
  auto never = PlanRanks(MicroJob("ep = 4\n"), {{"n1", 8}});
  ASSERT_FALSE(never.ok());
  EXPECT_TRUE(never.status().IsInvalidArgument()) << never.status().message();
  EXPECT_NE(never.status().message().find("n_group"), std::string::npos) << never.status().message();
  EXPECT_FALSE(IsDistributed(MicroJob("pp = 1\n").parallel));
}

protocol::RankAddress Entry(const std::string& node, uint64_t attempt, int rank, int round, const std::string& endpoint,
                            const std::string& key) {
  return protocol::RankAddress{node, attempt, rank, round, endpoint, key, 0};
}

TEST(RankRendezvous, HandsEveryRankTheWholeTableOnceAllAreIn) {
  auto k0 = transport::GenerateKeyPair();
  auto k1 = transport::GenerateKeyPair();
  ASSERT_TRUE(k0.ok() && k1.ok());
  RankRendezvous r;
  r.Reset(5, {{"n1", 0}, {"n2", 3}});
  auto first = r.Add(Entry("n1", 5, 0, 0, "tcp://127.0.0.1:4000", k0->public_key));
  ASSERT_TRUE(first.ok()) << first.status().message();
  EXPECT_TRUE(first->empty());
  auto repeat = r.Add(Entry("n1", 5, 0, 0, "tcp://127.0.0.1:4000", k0->public_key));
  ASSERT_TRUE(repeat.ok());
  EXPECT_TRUE(repeat->empty());
  auto last = r.Add(Entry("n2", 5, 1, 0, "tcp://10.0.0.2:4001", k1->public_key));
  ASSERT_TRUE(last.ok()) << last.status().message();
  ASSERT_EQ(last->size(), 2u);
  for (int i = 0; i < 2; ++i) {
    const auto& [slot, table] = (*last)[i];
    EXPECT_EQ(slot.node_id, i == 0 ? "n1" : "n2");
    EXPECT_EQ(table.worker, i == 0 ? 0 : 3);
    EXPECT_EQ(table.attempt, 5u);
    EXPECT_EQ(table.round, 0);
    EXPECT_EQ(table.endpoints, (std::vector<std::string>{"tcp://127.0.0.1:4000", "tcp://10.0.0.2:4001"}));
    EXPECT_EQ(table.public_keys, (std::vector<std::string>{k0->public_key, k1->public_key}));
  }
  // Rank 1 repeats its entry (its table was lost): it alone gets it again.
  auto again = r.Add(Entry("n2", 5, 1, 0, "tcp://10.0.0.2:4001", k1->public_key));
  ASSERT_TRUE(again.ok()) << again.status().message();
  ASSERT_EQ(again->size(), 1u);
  EXPECT_EQ((*again)[0].first.node_id, "n2");
  EXPECT_EQ((*again)[0].second.worker, 3);
  EXPECT_EQ((*again)[0].second.endpoints.size(), 2u);
  ASSERT_TRUE(r.Add(Entry("n2", 5, 1, 1, "tcp://10.0.0.2:4001", k1->public_key)).ok());
  auto ready = r.Add(Entry("n1", 5, 0, 1, "tcp://127.0.0.1:4000", k0->public_key));
  ASSERT_TRUE(ready.ok()) << ready.status().message();
  ASSERT_EQ(ready->size(), 2u);
  EXPECT_EQ((*ready)[0].second.round, 1);
  // A coordinator that restarted mid-rendezvous: rank 0 is past round 0
  // (it repeats round 1), rank 1 still waits for round 0's table.
  RankRendezvous restarted;
  restarted.Reset(5, {{"n1", 0}, {"n2", 3}});
  auto r1 = restarted.Add(Entry("n1", 5, 0, 1, "tcp://127.0.0.1:4000", k0->public_key));
  ASSERT_TRUE(r1.ok()) << r1.status().message();
  EXPECT_TRUE(r1->empty());
  auto r0 = restarted.Add(Entry("n2", 5, 1, 0, "tcp://10.0.0.2:4001", k1->public_key));
  ASSERT_TRUE(r0.ok()) << r0.status().message();
  ASSERT_EQ(r0->size(), 2u);  // round 0 complete: rank 0's round-1 entry stood for its round 0
  EXPECT_EQ((*r0)[0].second.round, 0);
  EXPECT_EQ((*r0)[0].second.endpoints[0], "tcp://127.0.0.1:4000");
  auto r1done = restarted.Add(Entry("n2", 5, 1, 1, "tcp://10.0.0.2:4001", k1->public_key));
  ASSERT_TRUE(r1done.ok());
  ASSERT_EQ(r1done->size(), 2u);  // and round 1
  EXPECT_EQ((*r1done)[0].second.round, 1);
  // A new attempt starts from nothing.
  r.Reset(6, {{"n1", 0}, {"n2", 3}});
  auto stale = r.Add(Entry("n1", 5, 0, 0, "tcp://127.0.0.1:4000", k0->public_key));
  EXPECT_FALSE(stale.ok());
}

TEST(RankRendezvous, RefusesEntriesANodeMayNotMake) {
  auto k = transport::GenerateKeyPair();
  ASSERT_TRUE(k.ok());
  RankRendezvous r;
  r.Reset(2, {{"n1", 0}, {"n2", 0}});
  const std::string good = "tcp://127.0.0.1:4000";
  struct Case {
    protocol::RankAddress a;
    const char* says;
  } cases[] = {
      {Entry("n1", 1, 0, 0, good, k->public_key), "not the running attempt"},
      {Entry("n2", 2, 0, 0, good, k->public_key), "runs on node n1"},  // n2 speaking for n1's rank
      {Entry("n1", 2, 2, 0, good, k->public_key), "has 2 ranks"},
      {Entry("n1", 2, -1, 0, good, k->public_key), "has 2 ranks"},
      {Entry("n1", 2, 0, 7, good, k->public_key), "is not 0 or 1"},
      {Entry("n1", 2, 0, 1, "", ""), "malformed address"},  // round 1 carries the address too
      {Entry("n1", 2, 0, 0, "ipc:///tmp/x", k->public_key), "malformed address"},
      {Entry("n1", 2, 0, 0, "tcp://127.0.0.1:0", k->public_key), "malformed address"},
      {Entry("n1", 2, 0, 0, "tcp://127.0.0.1:99999", k->public_key), "malformed address"},
      {Entry("n1", 2, 0, 0, "tcp://a b:4000", k->public_key), "malformed address"},
      {Entry("n1", 2, 0, 0, good, "short"), "malformed address"},
      {Entry("n1", 2, 0, 0, good, std::string(40, '"')), "malformed address"},
  };
  for (const Case& c : cases) {
    auto out = r.Add(c.a);
    ASSERT_FALSE(out.ok()) << c.says;
    EXPECT_NE(out.status().message().find(c.says), std::string::npos) << out.status().message();
  }
  ASSERT_TRUE(r.Add(Entry("n1", 2, 0, 0, good, k->public_key)).ok());
  auto changed = r.Add(Entry("n1", 2, 0, 0, "tcp://127.0.0.1:4001", k->public_key));
  ASSERT_FALSE(changed.ok());
  EXPECT_NE(changed.status().message().find("second, different entry"), std::string::npos);
}

TEST(JobTracker, RanksReportProgressFromRankZeroAndAnyNodeOfTheAttemptInterruptsIt) {
  JobRecord rec;
  rec.config_name = "micro";
  JobTracker t(rec);
  EXPECT_FALSE(t.AssignRanks({}, 1, 0));
  ASSERT_TRUE(t.AssignRanks({{"n1", 0}, {"n2", 1}}, 1, 0));
  EXPECT_EQ(t.record().attempt, 1u);
  EXPECT_EQ(t.record().node_id, "n1");
  StepUpdate u;
  u.attempt = 1;
  u.step = 4;
  u.rank = 1;
  EXPECT_FALSE(t.OnReport("n1", u));  // rank 1 runs on n2
  EXPECT_TRUE(t.OnReport("n2", u));
  EXPECT_EQ(t.record().step, 0);  // only rank 0 reports progress
  u.rank = 0;
  u.checkpoint_id = "ckpt-000001";
  u.checkpoint_step = 4;
  EXPECT_TRUE(t.OnReport("n1", u));
  EXPECT_EQ(t.record().step, 4);
  EXPECT_EQ(t.record().checkpoint_id, "ckpt-000001");
  EXPECT_FALSE(t.OnNodeLost("n3", "dead"));
  EXPECT_TRUE(t.OnNodeLost("n2", "dead"));  // not rank 0's node: the attempt is lost all the same
  EXPECT_EQ(t.record().state, JobState::kInterrupted);
  EXPECT_TRUE(t.record().ranks.empty());
  ASSERT_TRUE(t.AssignRanks({{"n1", 0}, {"n1", 1}}, 1, 4));
  EXPECT_EQ(t.record().step, 4);
  EXPECT_EQ(t.record().checkpoint_id, "ckpt-000001");
  u.attempt = 2;
  u.rank = 1;
  u.error = "receive timed out";
  EXPECT_TRUE(t.OnReport("n1", u));
  EXPECT_EQ(t.record().state, JobState::kFailed);
  EXPECT_EQ(t.record().message, "rank 1: receive timed out");
}

TEST(JobTracker, AnImpossibleJobFails) {
  JobTracker t(JobRecord{});
  t.Fail("the layout cannot run: x");
  EXPECT_EQ(t.record().state, JobState::kFailed);
  EXPECT_FALSE(t.NeedsWorker());
}

TEST(StateStore, ADistributedJobsRanksAndCheckpointSurviveTheRoundTrip) {
  const auto dir = std::filesystem::temp_directory_path() / "troupe_dist_job_state";
  std::filesystem::remove_all(dir);
  {
    auto s = StateStore::Open(dir.string());
    ASSERT_TRUE(s.ok()) << s.status().message();
    JobRecord r;
    r.config_name = "micro";
    r.state = JobState::kRunning;
    r.attempt = 3;
    r.node_id = "n1";
    r.worker = 0;
    r.ranks = {{"n1", 0}, {"n4", 2}};
    r.dp = 1;
    r.checkpoint_id = "ckpt-000007";
    r.checkpoint_step = 140;
    ASSERT_TRUE((*s)->SaveJob(r).ok());
  }
  auto s = StateStore::Open(dir.string());
  ASSERT_TRUE(s.ok());
  auto j = (*s)->LoadJob();
  ASSERT_TRUE(j.ok() && j->has_value()) << j.status().message();
  const JobRecord& r = **j;
  ASSERT_EQ(r.ranks.size(), 2u);
  EXPECT_EQ(r.ranks[1].node_id, "n4");
  EXPECT_EQ(r.ranks[1].worker, 2);
  EXPECT_EQ(r.checkpoint_id, "ckpt-000007");
  EXPECT_EQ(r.checkpoint_step, 140);
  std::filesystem::remove_all(dir);
}

TEST(StateStore, AMalformedRankEntryIsACorruptionNamingIt) {
  JobRecord r;
  r.config_name = "micro";
  r.ranks = {{"n1", 0}};
  const std::string good = StateStore::EncodeJob(r);
  ASSERT_TRUE(StateStore::DecodeJob(good).ok());
  for (const char* ranks : {R"("ranks":[["n1"]])", R"("ranks":[["n1","0"]])", R"("ranks":{"n1":0})"}) {
    std::string bad = good;
    const size_t at = bad.find(R"("ranks":[["n1",0]])");
    ASSERT_NE(at, std::string::npos) << good;
    bad.replace(at, std::string(R"("ranks":[["n1",0]])").size(), ranks);
    auto d = StateStore::DecodeJob(bad);
    ASSERT_FALSE(d.ok()) << ranks;
    EXPECT_TRUE(d.status().IsCorruption()) << d.status().message();
    EXPECT_NE(d.status().message().find("rank"), std::string::npos) << d.status().message();
  }
}

}  // namespace
}  // namespace troupe::cluster
