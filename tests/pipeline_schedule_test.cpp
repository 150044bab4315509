// Pipeline schedules (train/parallel/schedule.h): every kind builds, checks
// and simulates over a grid of shapes; DualPipe keeps the reference's op
// counts and order; broken schedules are refused with a message that names the
// problem; and the simulated bubbles stand where the BRIEF §2 table says.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "train/parallel/schedule.h"

namespace troupe::parallel {
namespace {

constexpr ScheduleKind kAllKinds[] = {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                                      ScheduleKind::kDualPipeV};

Schedule Build(ScheduleKind kind, int ranks, int micro, bool split_w) {
  auto s = BuildSchedule(kind, ranks, micro, split_w);
  EXPECT_TRUE(s.ok()) << s.status().message();
  return s.ok() ? *s : Schedule{};
}

SimResult Sim(const Schedule& s, const OpCosts& costs) {
  auto r = Simulate(s, costs);
  EXPECT_TRUE(r.ok()) << r.status().message();
  return r.ok() ? *r : SimResult{};
}

// Micro-batch counts each kind accepts on `ranks` ranks, small and large.
std::vector<int> MicroBatchGrid(ScheduleKind kind, int ranks) {
  switch (kind) {
    case ScheduleKind::kDualPipe:
      return {2 * ranks, 2 * ranks + 2, 3 * ranks + (3 * ranks) % 2, 4 * ranks, 8 * ranks};
    case ScheduleKind::kDualPipeV:
      return {2 * ranks, 2 * ranks + 1, 3 * ranks, 5 * ranks};
    default:
      return {1, std::max(1, ranks - 1), ranks, ranks + 1, 2 * ranks, 4 * ranks + 3};
  }
}

// The worked example's chunk costs (BRIEF §2): F=1, B=2, W=1, with F&B given.
OpCosts Costs(double fb) { return {.f = 1, .b = 2, .w = 1, .fb = fb}; }

TEST(PipelineSchedule, KindNamesRoundTrip) {
  for (ScheduleKind k : kAllKinds) {
    auto parsed = ParseScheduleKind(ScheduleKindName(k));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, k);
  }
  auto bad = ParseScheduleKind("gpipe");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("expected 1f1b, zb1p, dualpipe or dualpipev"), std::string::npos);
}

TEST(PipelineSchedule, EveryKindChecksOverAGrid) {
  int checked = 0;
  for (ScheduleKind kind : kAllKinds)
    for (int ranks : {1, 2, 3, 4, 6, 8}) {
      if (kind == ScheduleKind::kDualPipe && ranks % 2 != 0) continue;
      for (int micro : MicroBatchGrid(kind, ranks))
        for (bool split : {true, false}) {
          SCOPED_TRACE(std::string(ScheduleKindName(kind)) + " ranks=" + std::to_string(ranks) +
                       " micro=" + std::to_string(micro) + (split ? " split" : " fused"));
          Schedule s = Build(kind, ranks, micro, split);
          ASSERT_EQ(s.stages, StageCount(kind, ranks));
          Status st = CheckSchedule(s);
          ASSERT_TRUE(st.ok()) << st.message();
          // Each rank runs one F, one B (and one W when split) per chunk placed on it.
          std::vector<int> placed(ranks, 0), ops(ranks, 0);
          for (int m = 0; m < micro; ++m)
            for (int stage = 0; stage < s.stages; ++stage) ++placed[s.Place({m, stage}).rank];
          for (int r = 0; r < ranks; ++r) {
            int n = 0;
            for (const Op& op : s.per_rank[r]) {
              n += op.kind == OpKind::kForwardBackward ? 2 : 1;
              EXPECT_TRUE(split || op.kind != OpKind::kWeight);
            }
            EXPECT_EQ(n, placed[r] * (split ? 3 : 2)) << "rank " << r;
          }
          ++checked;
        }
    }
  EXPECT_GT(checked, 150);
}

TEST(PipelineSchedule, DualPipeRanksRunHalfTheMicroBatchesInEachDirection) {
  for (int pp : {2, 4, 6, 8})
    for (int c : {2 * pp, 4 * pp + 2}) {
      Schedule s = Build(ScheduleKind::kDualPipe, pp, c, true);
      for (int r = 0; r < pp; ++r) {
        int f[2] = {0, 0}, b[2] = {0, 0}, fb = 0;
        for (const Op& op : s.per_rank[r]) {
          if (op.kind == OpKind::kForward || op.kind == OpKind::kForwardBackward) ++f[s.Place(op.f).module];
          if (op.kind == OpKind::kBackward || op.kind == OpKind::kForwardBackward) ++b[s.Place(op.b).module];
          fb += op.kind == OpKind::kForwardBackward;
        }
        EXPECT_EQ(f[0], c / 2);
        EXPECT_EQ(f[1], c / 2);
        EXPECT_EQ(b[0], c / 2);
        EXPECT_EQ(b[1], c / 2);
        // Overlapped pairs: two per main-step round (one fewer on the middle
        // ranks, whose first round runs apart) plus one per step-5 round.
        const int h = std::min(r, pp - 1 - r), middle = h == pp / 2 - 1;
        EXPECT_EQ(fb, 2 * (c / 2 - pp + h + 1) - middle + (pp / 2 - h - 1)) << "pp " << pp << " rank " << r;
      }
    }
  // DualPipeV: every rank runs each of its two stages for all C micro-batches.
  Schedule v = Build(ScheduleKind::kDualPipeV, 4, 10, true);
  for (int r = 0; r < 4; ++r) {
    int f[2] = {0, 0};
    for (const Op& op : v.per_rank[r])
      if (op.kind == OpKind::kForward || op.kind == OpKind::kForwardBackward) ++f[v.Place(op.f).module];
    EXPECT_EQ(f[0], 10);
    EXPECT_EQ(f[1], 10);
  }
}

TEST(PipelineSchedule, DualPipeFollowsTheReferenceSteps) {
  // PP=4, C=8, worked by hand from dualpipe.py's step(): ' is the reverse
  // direction (micro-batches 4..7, module 1); + an F&B pair. Rank 0 (h=0):
  // step 1 F0 F1 | 2 F2 F4' | 3 B4' W4' F5' | 4 F3+B5' F6'+B0 | 5 B6' F7'+B1 |
  // 6 B7' B2 (deferred) | 7 W2 B3 (deferred) | 8 W3. Ranks 1 and 2 are the
  // middle: their first main round runs F and B apart.
  Schedule s = Build(ScheduleKind::kDualPipe, 4, 8, true);
  EXPECT_EQ(RankOpsToString(s, 0),
            "F0 F1 F2 F4' B4' W4' F5' F3+B5' W5' F6'+B0 W0 B6' W6' F7'+B1 W1 B7' W7' B2 W2 B3 W3");
  EXPECT_EQ(RankOpsToString(s, 1),
            "F0 F4' F1 F5' F2 B4' W4' F6'+B0 W0 F3+B5' W5' F7'+B1 W1 B6' W6' B2 W2 B7' B3 W7' W3");
  EXPECT_EQ(RankOpsToString(s, 3),
            "F4' F5' F6' F0 B0 W0 F1 F7'+B1 W1 F2+B4' W4' B2 W2 F3+B5' W5' B3 W3 B6' W6' B7' W7'");
  // Without split_w the W's fold into their B's and nothing else moves.
  Schedule fused = Build(ScheduleKind::kDualPipe, 4, 8, false);
  EXPECT_EQ(RankOpsToString(fused, 0), "F0 F1 F2 F4' B4' F5' F3+B5' F6'+B0 B6' F7'+B1 B7' B2 B3");
}

TEST(PipelineSchedule, RefusesImpossibleParameters) {
  struct Case {
    ScheduleKind kind;
    int ranks, micro;
    const char* says;
  } cases[] = {
      {ScheduleKind::k1F1B, 0, 4, "at least 1 rank"},
      {ScheduleKind::kZB1P, 4, 0, "at least 1 micro-batch"},
      {ScheduleKind::kDualPipe, 3, 12, "even number of ranks"},
      {ScheduleKind::kDualPipe, 4, 9, "even number of micro-batches"},
      {ScheduleKind::kDualPipe, 4, 6, "micro-batches >= 2 x ranks = 8"},
      {ScheduleKind::kDualPipeV, 4, 7, "micro-batches >= 2 x ranks = 8"},
      {ScheduleKind::k1F1B, 1 << 16, 1 << 16, "more chunks than"},
  };
  for (const Case& c : cases) {
    auto s = BuildSchedule(c.kind, c.ranks, c.micro, true);
    ASSERT_FALSE(s.ok()) << ScheduleKindName(c.kind) << " " << c.ranks << " " << c.micro;
    EXPECT_TRUE(s.status().IsInvalidArgument());
    EXPECT_NE(s.status().message().find(c.says), std::string::npos) << s.status().message();
  }
  EXPECT_TRUE(BuildSchedule(ScheduleKind::k1F1B, 1, 3, true).ok());  // one rank: no pipeline, still a schedule
  EXPECT_TRUE(BuildSchedule(ScheduleKind::kDualPipeV, 1, 2, true).ok());
}

// A check failure whose message holds every one of `needles`.
void ExpectRefused(const Schedule& s, std::initializer_list<const char*> needles) {
  Status st = CheckSchedule(s);
  ASSERT_FALSE(st.ok());
  for (const char* n : needles) EXPECT_NE(st.message().find(n), std::string::npos) << st.message();
  EXPECT_FALSE(Simulate(s, OpCosts{}).ok());
}

TEST(PipelineSchedule, RefusesBrokenSchedules) {
  // 1F1B, 2 ranks, 4 micro-batches, fused:
  //   rank 0: F0 F1 B0 F2 B1 F3 B2 B3     rank 1: F0 B0 F1 B1 F2 B2 F3 B3
  const Schedule good = Build(ScheduleKind::k1F1B, 2, 4, false);
  ASSERT_EQ(RankOpsToString(good, 0), "F0 F1 B0 F2 B1 F3 B2 B3");
  ASSERT_EQ(RankOpsToString(good, 1), "F0 B0 F1 B1 F2 B2 F3 B3");

  // Deadlock: rank 0 runs B0 before F1 and rank 1 runs F1 before B0. Rank 0
  // waits for rank 1's B0, which waits behind F1, which waits for rank 0's F1.
  Schedule deadlock = good;
  std::swap(deadlock.per_rank[0][1], deadlock.per_rank[0][2]);
  std::swap(deadlock.per_rank[1][1], deadlock.per_rank[1][2]);
  ExpectRefused(deadlock, {"deadlocks", "rank 0 op 1 B(m0,s0) waits for B(m0,s1) (rank 1 op 2)",
                           "rank 1 op 1 F(m1,s1) waits for F(m1,s0) (rank 0 op 2)"});
  // Either swap alone only delays: still a valid schedule.
  Schedule slow = good;
  std::swap(slow.per_rank[0][1], slow.per_rank[0][2]);
  EXPECT_TRUE(CheckSchedule(slow).ok());

  // A backward before its own forward, on one rank.
  Schedule early = good;
  std::swap(early.per_rank[1][0], early.per_rank[1][1]);
  ExpectRefused(early, {"rank 1 op 0 B(m0,s1) needs F(m0,s1), which rank 1 runs later (op 1)"});

  Schedule dropped = good;
  dropped.per_rank[1].erase(dropped.per_rank[1].begin() + 3);
  ExpectRefused(dropped, {"rank 1 never runs B(m1,s1)"});

  Schedule twice = good;
  twice.per_rank[0].push_back(twice.per_rank[0][0]);
  ExpectRefused(twice, {"F(m0,s0) runs twice: rank 0 op 0 and rank 0 op 8"});

  Schedule wrong_rank = good;
  std::swap(wrong_rank.per_rank[0].back(), wrong_rank.per_rank[1].back());
  ExpectRefused(wrong_rank, {"rank 0 op 7 B(m3,s1): stage 1 of micro-batch 3 runs on rank 1"});

  Schedule stray_w = good;
  stray_w.per_rank[0].push_back({OpKind::kWeight, {}, {0, 0}});
  ExpectRefused(stray_w, {"not split_w"});

  // DualPipe: rank 0's first F&B pair (F3+B5') moved ahead of F5' would run
  // B5' before its own forward.
  Schedule dp = Build(ScheduleKind::kDualPipe, 4, 8, true);
  const auto fb = std::find_if(dp.per_rank[0].begin(), dp.per_rank[0].end(),
                               [](const Op& op) { return op.kind == OpKind::kForwardBackward; });
  ASSERT_NE(fb, dp.per_rank[0].end());
  std::iter_swap(fb, fb - 3);  // before B4': F3+B5' cannot run before rank 0 ran F5' (op 6)
  ExpectRefused(dp, {"rank 0 op 4 FB(m3,s0|m5,s3) needs F(m5,s3), which rank 0 runs later"});

  Schedule shape = good;
  shape.stages = 3;
  ExpectRefused(shape, {"has 2 stages, not 3"});
}

TEST(PipelineSchedule, JsonRoundTrip) {
  for (ScheduleKind kind : kAllKinds) {
    const Schedule s = Build(kind, 4, 8, kind != ScheduleKind::kZB1P);
    const SimResult sim = Sim(s, Costs(2));
    const nlohmann::json j = ScheduleToJson(s, &sim);
    for (const char* key : {"format", "version", "kind", "ranks", "stages", "micro_batches", "split_w", "placement",
                            "per_rank", "simulation"})
      EXPECT_TRUE(j.contains(key)) << key;
    EXPECT_EQ(j["kind"], ScheduleKindName(kind));
    EXPECT_EQ(j["placement"].size(), 8u);
    EXPECT_EQ(j["placement"][0].size(), static_cast<size_t>(s.stages));
    const Placement last = s.Place({7, 0});
    EXPECT_EQ(j["placement"][7][0], nlohmann::json({last.rank, last.module}));
    EXPECT_EQ(j["simulation"]["bubble"].size(), 4u);
    EXPECT_EQ(j["simulation"]["timing"][0].size(), s.per_rank[0].size());
    const nlohmann::json& op0 = j["per_rank"][0][0];
    EXPECT_EQ(op0["op"], "F");
    EXPECT_EQ(op0["micro"], s.per_rank[0][0].f.micro);

    // Through text and back: the same schedule.
    auto back = ScheduleFromJson(nlohmann::json::parse(j.dump()));
    ASSERT_TRUE(back.ok()) << back.status().message();
    EXPECT_EQ(back->kind, s.kind);
    EXPECT_EQ(back->ranks, s.ranks);
    EXPECT_EQ(back->stages, s.stages);
    EXPECT_EQ(back->micro_batches, s.micro_batches);
    EXPECT_EQ(back->split_w, s.split_w);
    EXPECT_EQ(back->per_rank, s.per_rank);
  }
  nlohmann::json j = ScheduleToJson(Build(ScheduleKind::kDualPipe, 2, 4, true));
  EXPECT_FALSE(j.contains("simulation"));
  j["per_rank"][1][2]["op"] = "X";
  auto bad = ScheduleFromJson(j);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("rank 1 op 2 has op 'X'"), std::string::npos) << bad.status().message();
  j["per_rank"][1][2] = {{"op", "F"}, {"micro", "one"}, {"stage", 0}};
  EXPECT_FALSE(ScheduleFromJson(j).ok());
  j["version"] = 2;
  EXPECT_FALSE(ScheduleFromJson(j).ok());
}

TEST(PipelineSchedule, FormulaReproducesTheWorkedExample) {
  // BRIEF §2: PP=16, F=1, B=2, W=1.
  EXPECT_DOUBLE_EQ(FormulaBubble(ScheduleKind::k1F1B, 16, Costs(-1)), 45);
  EXPECT_DOUBLE_EQ(FormulaBubble(ScheduleKind::kZB1P, 16, Costs(-1)), 15);
  EXPECT_DOUBLE_EQ(FormulaBubble(ScheduleKind::kDualPipe, 16, Costs(3)), 14);  // F&B = F+B: no overlap gain
  EXPECT_DOUBLE_EQ(FormulaBubble(ScheduleKind::kDualPipe, 16, Costs(2)), 7);
  EXPECT_DOUBLE_EQ(FormulaBubble(ScheduleKind::kDualPipe, 16, Costs(-1)), 14);  // default F&B = F+B
  // DualPipeV over 8 ranks runs the 16 stages DualPipe runs over 16.
  EXPECT_DOUBLE_EQ(FormulaBubble(ScheduleKind::kDualPipeV, 8, Costs(2)), 7);
}

TEST(PipelineSchedule, OneFOneBBubbleIsExactlyTheFormula) {
  // Fused backward (no W ops): every rank idles (PP-1)(F+B), the pipeline's
  // fill and drain, whatever C.
  for (const OpCosts& c : {OpCosts{1, 2, 1, -1}, OpCosts{1.5, 2.25, 0.5, -1}, OpCosts{3, 1, 0.5, -1}})
    for (int pp : {1, 2, 4, 8, 16})
      for (int micro : {pp, 2 * pp + 1, 4 * pp}) {
        const SimResult r = Sim(Build(ScheduleKind::k1F1B, pp, micro, false), c);
        for (int rank = 0; rank < pp; ++rank)
          EXPECT_DOUBLE_EQ(r.bubble[rank], FormulaBubble(ScheduleKind::k1F1B, pp, c))
              << "pp " << pp << " micro " << micro << " rank " << rank;
      }
}

TEST(PipelineSchedule, ZeroBubbleH1BubbleIsExactlyTheFormula) {
  // ZB1P with split W: every rank idles (PP-1)(F+B-2W) once C >= PP. Split
  // 1F1B (each W right after its B) lets gradients leave W sooner but has no
  // W to fill the cool-down: (PP-1)(F+B-W).
  for (const OpCosts& c : {OpCosts{1, 2, 1, -1}, OpCosts{1, 2, 0.5, -1}, OpCosts{2, 3, 1, -1}})
    for (int pp : {2, 4, 8, 16})
      for (int micro : {pp, 3 * pp}) {
        const SimResult zb = Sim(Build(ScheduleKind::kZB1P, pp, micro, true), c);
        const SimResult split_1f1b = Sim(Build(ScheduleKind::k1F1B, pp, micro, true), c);
        for (int rank = 0; rank < pp; ++rank) {
          EXPECT_DOUBLE_EQ(zb.bubble[rank], FormulaBubble(ScheduleKind::kZB1P, pp, c)) << pp << " " << rank;
          EXPECT_DOUBLE_EQ(split_1f1b.bubble[rank], (pp - 1) * (c.f + c.b - c.w)) << pp << " " << rank;
        }
      }
}

// DualPipe's simulated bubble against the table's (PP/2-1)(F&B+B-3W).
//
// Middle vs edge: all ranks share one makespan, but rank h (h = min(r,
// PP-1-r)) runs PP/2-2-h fewer overlapped pairs than a middle rank (h =
// PP/2-1), each of which would have saved it F+B-F&B. So every edge rank is
// busier and idles exactly (F+B-F&B)(PP/2-2-h) less than the middle; with no
// overlap gain (F&B = F+B) all ranks idle alike.
//
// Middle vs formula: with the worked example's F=1, B=2, W=1 the middle ranks
// idle (PP/2-1)(F+B-2W) = PP/2-1 for any F&B in [F+B-W, F+B] = [2, 3]: equal
// to the formula at F&B=2 and below it otherwise, down to half of it at
// F&B=3. The table charges every pair's full backward before its gradient
// leaves; here a split pair's W is an op of its own, so the gradient leaves W
// sooner and the bubble stops growing with F&B. (The formula is a model, not
// a bound: for F > B, or W > B/2, or an overlap gain above W, the simulated
// bubble can exceed it. It holds on the grid below, where F <= B <= 2F,
// W <= B/2 and F+B-W <= F&B <= F+B.)
TEST(PipelineSchedule, DualPipeBubbleAgainstTheFormula) {
  for (ScheduleKind kind : {ScheduleKind::kDualPipe, ScheduleKind::kDualPipeV})
    for (int pp : {4, 8, 16}) {  // pipeline stages
      const int ranks = kind == ScheduleKind::kDualPipe ? pp : pp / 2;
      for (double fb : {2.0, 2.5, 3.0}) {
        const OpCosts c = Costs(fb);
        const SimResult r = Sim(Build(kind, ranks, 2 * pp, true), c);
        const double formula = FormulaBubble(kind, ranks, c);
        const double middle = (pp / 2 - 1) * (c.f + c.b - 2 * c.w);
        for (int rank = 0; rank < ranks; ++rank) {
          SCOPED_TRACE(std::string(ScheduleKindName(kind)) + " pp " + std::to_string(pp) + " F&B " +
                       std::to_string(fb) + " rank " + std::to_string(rank));
          // DualPipeV's rank r is DualPipe's rank r of the first half.
          const int h = std::min(rank, pp - 1 - rank);
          const int fewer_pairs = std::max(0, pp / 2 - 2 - h);
          EXPECT_NEAR(r.bubble[rank], middle - (c.f + c.b - fb) * fewer_pairs, 1e-9);
          EXPECT_LE(r.bubble[rank], formula + 1e-9);
        }
        // A middle rank (DualPipe: ranks/2; DualPipeV: the last) meets the formula at F&B = F+B-W.
        const int middle_rank = kind == ScheduleKind::kDualPipe ? ranks / 2 : ranks - 1;
        if (fb == 2.0) {
          EXPECT_NEAR(r.bubble[middle_rank], formula, 1e-9);
        }
      }
    }
  for (int pp : {2, 4, 6, 8, 12})
    for (double b : {1.0, 1.5, 2.0})
      for (double w_part : {0.25, 0.5})
        for (double gain_part : {0.0, 0.5, 1.0}) {
          const double w = b * w_part;
          const OpCosts c{1, b, w, 1 + b - w * gain_part};
          const SimResult r = Sim(Build(ScheduleKind::kDualPipe, pp, 2 * pp + 2, true), c);
          const double formula = FormulaBubble(ScheduleKind::kDualPipe, pp, c);
          for (double bubble : r.bubble) EXPECT_LE(bubble, formula + 1e-9) << pp << " " << b << " " << w << " " << c.fb;
        }
}

TEST(PipelineSchedule, DualPipeBubbleDoesNotGrowWithMicroBatches) {
  for (ScheduleKind kind : {ScheduleKind::kDualPipe, ScheduleKind::kDualPipeV})
    for (int ranks : {2, 4, 8})
      for (const OpCosts& c : {Costs(2), Costs(3), OpCosts{1, 1.5, 0.5, 2}})
        for (bool split : {true, false}) {
          const std::vector<double> first = Sim(Build(kind, ranks, 2 * ranks, split), c).bubble;
          for (int micro : {2 * ranks + 2, 4 * ranks, 10 * ranks}) {
            const std::vector<double> more = Sim(Build(kind, ranks, micro, split), c).bubble;
            ASSERT_EQ(more.size(), first.size());
            for (int r = 0; r < ranks; ++r)
              EXPECT_NEAR(more[r], first[r], 1e-9) << ScheduleKindName(kind) << " ranks " << ranks << " micro " << micro
                                                   << " rank " << r << (split ? " split" : " fused");
          }
        }
}

TEST(PipelineSchedule, SimulatorTimesOpsAndRefusesBadCosts) {
  const Schedule s = Build(ScheduleKind::k1F1B, 2, 2, true);  // rank 1: F0 B0 W0 F1 B1 W1
  const SimResult r = Sim(s, {.f = 1, .b = 3, .w = 1, .fb = -1});
  EXPECT_DOUBLE_EQ(r.timing[1][0].start, 1);  // after rank 0's F0
  EXPECT_DOUBLE_EQ(r.timing[1][1].end, 4);    // B costs b - w = 2 when split
  EXPECT_DOUBLE_EQ(r.makespan, r.busy[0] + r.bubble[0]);
  EXPECT_FALSE(Simulate(s, {.f = -1}).ok());
  EXPECT_FALSE(Simulate(s, {.f = 1, .b = 1, .w = 2}).ok());             // W is part of B
  EXPECT_FALSE(Simulate(s, {.f = 1, .b = 2, .w = 1, .fb = 0.5}).ok());  // F&B holds a W
}

}  // namespace
}  // namespace troupe::parallel
