// The planner and the placer: layouts chosen and refused with reasons, stages
// balanced, parameter holders, and ranks placed on nodes so that expert
// groups stay inside a node.
#include "train/parallel/layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <set>
#include <string>

#include "small_job.h"
#include "test_util.h"
#include "train/parallel/pipeline_runner.h"
#include "train/parallel/placement.h"

namespace troupe {
namespace {

using parallel::Layout;
using parallel::PlanLayout;

JobConfig Job() {
  JobConfig j;
  j.model.num_hidden_layers = 8;
  j.model.n_routed_experts = 8;
  j.model.n_group = 4;
  j.model.topk_group = 2;
  j.train.batch_size = 64;
  return j;
}

Layout Plan(const JobConfig& j, ParallelConfig p, int workers) {
  auto l = PlanLayout(j.model, j.train, p, workers);
  EXPECT_TRUE(l.ok()) << l.status().message();
  return l.ok() ? *l : Layout{};
}

TEST(Layout, AutoDataParallelTakesTheReplicasThatFit) {
  const JobConfig j = Job();
  ParallelConfig p;
  p.pp = 2;
  p.ep = 2;
  p.dp = 0;
  const Layout l = Plan(j, p, 9);
  EXPECT_EQ(l.dp, 2);
  EXPECT_EQ(l.world(), 8);
  EXPECT_EQ(l.idle_workers, 1);
  EXPECT_NE(l.Explain().find("1 worker(s) left idle"), std::string::npos) << l.Explain();
}

TEST(Layout, RefusesWhatCannotRunAndSaysWhy) {
  const JobConfig j = Job();
  struct Case {
    int pp, ep, dp, workers;
    const char* schedule;
    const char* needle;
  };
  for (const Case& c : std::vector<Case>{{2, 2, 2, 7, "1f1b", "needs 8 workers; there are 7"},
                                         {2, 4, 0, 7, "1f1b", "needs 8 workers; there are 7"},
                                         {3, 1, 1, 3, "dualpipe", "even"},
                                         {16, 1, 1, 16, "1f1b", "only 8 layers"},
                                         {1, 3, 1, 3, "1f1b", "does not divide"},
                                         {1, 8, 1, 8, "1f1b", "n_group"},
                                         {2, 1, 3, 6, "1f1b", "does not split"}}) {
    ParallelConfig p;
    p.pp = c.pp;
    p.ep = c.ep;
    p.dp = c.dp;
    p.schedule = c.schedule;
    auto l = PlanLayout(j.model, j.train, p, c.workers);
    ASSERT_FALSE(l.ok()) << c.needle;
    EXPECT_NE(l.status().message().find(c.needle), std::string::npos) << l.status().message();
  }
}

TEST(Layout, StagesCoverEveryLayerOnceAndTheHeadWeighsOnTheLastStage) {
  JobConfig j = Job();
  j.model.vocab_size = 32000;  // a heavy output head: the last stage should get fewer layers
  ParallelConfig p;
  p.pp = 4;
  const Layout l = Plan(j, p, 4);
  ASSERT_EQ(l.stages.size(), 4u);
  int next = 0;
  for (const StageSpan& s : l.stages) {
    EXPECT_EQ(s.first_layer, next);
    EXPECT_GT(s.end_layer, s.first_layer);
    next = s.end_layer;
  }
  EXPECT_EQ(next, j.model.num_hidden_layers);
  EXPECT_LT(l.stages.back().end_layer - l.stages.back().first_layer, j.model.num_hidden_layers / 4);
  EXPECT_GT(l.stage_cost.back(), 0.0);
}

TEST(Layout, DualPipeHoldsEveryStageTwiceAndExpertShardsOnlyWithTheirEpRank) {
  const JobConfig j = Job();
  ParallelConfig p;
  p.pp = 4;
  p.ep = 2;
  p.schedule = "dualpipe";
  const Layout l = Plan(j, p, 8);
  // Rank (pp 1, ep 0, dp 0) holds stages 1 and 2; its copies are pp ranks 1
  // and 2 (ep 0 and 1) for shared tensors, ep 0 only for expert shards.
  const int rank = l.RankOf({1, 0, 0});
  const auto holders = l.ParamHolders(j.model, rank);
  const std::string attn = "model.layers." + std::to_string(l.stages[1].first_layer) + ".self_attn.o_proj.weight";
  const std::string experts =
      "model.layers." + std::to_string(l.stages[1].first_layer) + ".mlp.experts.down_proj.weight";
  EXPECT_EQ(holders.at(attn),
            (std::vector<int>{l.RankOf({1, 0, 0}), l.RankOf({2, 0, 0}), l.RankOf({1, 1, 0}), l.RankOf({2, 1, 0})}));
  EXPECT_EQ(holders.at(experts), (std::vector<int>{l.RankOf({1, 0, 0}), l.RankOf({2, 0, 0})}));
  EXPECT_EQ(l.ExpertGroupOf(rank), (std::vector<int>{l.RankOf({1, 0, 0}), l.RankOf({1, 1, 0})}));
}

TEST(Placement, ExpertGroupsStayOnANodeAndPipelinesOnFewNodes) {
  const JobConfig j = Job();
  ParallelConfig p;
  p.pp = 2;
  p.ep = 2;
  p.dp = 2;
  const Layout l = Plan(j, p, 8);
  auto placed = parallel::PlaceRanks(l, {{"a", 4}, {"b", 4}});
  ASSERT_TRUE(placed.ok()) << placed.status().message();
  EXPECT_EQ(placed->split_expert_groups, 0) << placed->explanation;
  std::set<std::pair<std::string, int>> seen;
  for (int r = 0; r < l.world(); ++r) {
    const parallel::WorkerRef& w = placed->rank_to_worker[r];
    EXPECT_TRUE(seen.insert({w.node, w.worker}).second) << "two ranks on " << w.node << ":" << w.worker;
    EXPECT_LT(w.worker, 4);
    for (int other : l.ExpertGroupOf(r)) EXPECT_EQ(placed->rank_to_worker[other].node, w.node);
    // A replica's two stages share a node (4 workers hold one replica).
    parallel::RankCoord c = l.CoordOf(r);
    c.pp_rank = 1 - c.pp_rank;
    EXPECT_EQ(placed->rank_to_worker[l.RankOf(c)].node, w.node) << placed->explanation;
  }
}

TEST(Placement, SplitsAGroupOnlyWhenNoNodeCanHoldIt) {
  const JobConfig j = Job();
  ParallelConfig p;
  p.ep = 4;
  const Layout l = Plan(j, p, 4);
  auto placed = parallel::PlaceRanks(l, {{"a", 2}, {"b", 3}});
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->split_expert_groups, 1);
  EXPECT_NE(placed->explanation.find("crosses the network"), std::string::npos) << placed->explanation;
  auto short_of = parallel::PlaceRanks(l, {{"a", 1}, {"b", 2}});
  ASSERT_FALSE(short_of.ok());
  EXPECT_NE(short_of.status().message().find("needs 4 workers; the 2 node(s) have 3"), std::string::npos);
}

// NCCL matches a link's transfers by order: every built-in schedule issues
// each link's transfers in the order its receiver takes them, with one link
// per adjacent pair of stages, direction and kind in every replica.
TEST(PipelineLinks, EveryBuiltInScheduleIssuesEachLinkInOneOrder) {
  const JobConfig j = Job();
  for (const char* kind : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
    for (int pp : {2, 4}) {
      for (int dp : {1, 2}) {
        for (int ep : {1, 2}) {
          ParallelConfig p;
          p.schedule = kind;
          p.pp = pp;
          p.dp = dp;
          p.ep = ep;
          const Layout l = Plan(j, p, pp * dp * ep);
          auto schedule = parallel::BuildSchedule(l.schedule, l.pp, l.micro_batches, l.split_w);
          ASSERT_TRUE(schedule.ok()) << schedule.status().message();
          auto links = parallel::PipelineLinks(l, *schedule);
          ASSERT_TRUE(links.ok()) << kind << " pp" << pp << ": " << links.status().message();
          const bool both_ways = std::string(kind).starts_with("dualpipe");
          EXPECT_EQ(links->size(), static_cast<size_t>((both_ways ? 4 : 2) * (pp - 1) * dp * ep))
              << kind << " pp" << pp;
          for (const parallel::DeviceLink& link : *links) {
            parallel::RankCoord from = l.CoordOf(link.from), to = l.CoordOf(link.to);
            EXPECT_EQ(std::abs(from.pp_rank - to.pp_rank), 1) << parallel::LinkName(link);
            to.pp_rank = from.pp_rank;
            EXPECT_EQ(l.RankOf(to), link.from) << parallel::LinkName(link) << " crosses replicas";
          }
        }
      }
    }
  }
}

// A schedule (one read from JSON, say) whose receiver takes a link's
// transfers in another order than its sender issues them is refused,
// naming the link and the two chunks.
TEST(PipelineLinks, ATransferOrderTheTwoEndsDisagreeOnIsRefused) {
  const JobConfig j = Job();
  ParallelConfig p;
  p.pp = 2;
  const Layout l = Plan(j, p, 2);
  auto schedule = parallel::BuildSchedule(l.schedule, l.pp, l.micro_batches, l.split_w);
  ASSERT_TRUE(schedule.ok());
  auto& ops = schedule->per_rank[1];
  auto first = std::find_if(ops.begin(), ops.end(), [](const parallel::Op& o) {
    return o.f.micro == 0 && o.kind == parallel::OpKind::kForward;
  });
  auto second = std::find_if(ops.begin(), ops.end(), [](const parallel::Op& o) {
    return o.f.micro == 1 && o.kind == parallel::OpKind::kForward;
  });
  ASSERT_TRUE(first != ops.end() && second != ops.end());
  std::swap(first->f, second->f);
  auto links = parallel::PipelineLinks(l, *schedule);
  ASSERT_FALSE(links.ok());
  EXPECT_NE(links.status().message().find("activation link from rank 0 to rank 1 would carry micro-batch 0 stage 1 "
                                          "as transfer 1 where the receiver takes micro-batch 1 stage 1"),
            std::string::npos)
      << links.status().message();
}

}  // namespace
}  // namespace troupe
