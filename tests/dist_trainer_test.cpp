// Distributed training equals the single-process run: the same global batch
// cut into pipeline stages (1F1B, DualPipe, DualPipeV) and data-parallel
// shards gives the same losses, gradients and weights (fp32, relative 1e-5).
// Ranks run as threads over the in-process group here; tests/dist_process_test
// runs them as real processes over CURVE ZeroMQ.
#include "train/parallel/dist_trainer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/host_io.h"
#include "small_job.h"
#include "test_util.h"
#include "thread_comm.h"
#include "train/parallel/collectives.h"
#include "train/parallel/tags.h"
#include "train/trainer.h"

namespace troupe {
namespace {

using parallel::DistributedTrainer;
using parallel::Layout;

struct RunResult {
  std::vector<double> losses;  // per step
  std::vector<double> grad_norms;
  std::map<std::string, std::vector<double>> grads;   // after the first step
  std::map<std::string, std::vector<double>> params;  // after the last step
  size_t optimizer_bytes = 0;                         // AdamW state, all ranks together
  int ep_max_ranks = 0;                               // expert parallelism: most ranks one token reached
  double ep_remote_share = 0;                         // and the share of token copies that travelled
  bool pairs_overlapped = false;                      // rank 0 ran F&B pairs on two threads
  std::string device_comm;                            // rank 0's gradient path
  double eval = 0;                                    // validation loss after the last step
};

JobConfig EquivalenceJob(const std::filesystem::path& dir) { return testing::SmallPipelineJob(dir); }

void Collect(ModelParams& p, std::map<std::string, std::vector<double>>& into, Backend& be) {
  for (ParamRef& r : ListParams(p)) into[r.name] = ToHostDoubles(be, *r.tensor);
}

RunResult RunSingle(const JobConfig& job, int steps) {
  CpuBackend be(1);
  auto t = Trainer::Create(be, job);
  EXPECT_TRUE(t.ok()) << t.status().message();
  RunResult out;
  for (int s = 0; s < steps; ++s) {
    auto r = (*t)->Step();
    EXPECT_TRUE(r.ok()) << r.status().message();
    out.losses.push_back(r->loss.total);
    out.grad_norms.push_back(r->grad_norm);
    if (s == 0) Collect((*t)->model().grads(), out.grads, be);
  }
  auto eval = (*t)->Evaluate();
  EXPECT_TRUE(eval.ok()) << eval.status().message();
  out.eval = eval.ok() ? *eval : -1;
  Collect((*t)->model().params(), out.params, be);
  return out;
}

using Tensors = std::map<std::string, std::vector<double>>;

// Adds `tensors` to `into`; a name already there must hold the same bits
// (two copies of one tensor, on one rank or on two).
void MergeCopies(Tensors& into, const Tensors& tensors, const std::string& what) {
  for (const auto& [name, v] : tensors) {
    auto [it, fresh] = into.emplace(name, v);
    if (!fresh) {
      EXPECT_EQ(it->second, v) << what << ": two different copies of " << name;
    }
  }
}

// Every rank on its own thread; returns rank 0's losses and every rank's
// tensors (copies held twice must agree bit for bit).
// `device`: buckets, expert rows and stage-to-stage transfers take the
// device paths, over CPU
// stand-ins for NCCL (tests/thread_comm.h).
RunResult RunDistributed(const JobConfig& job, const Layout& layout, int steps, bool zero1, bool device = false) {
  auto group = parallel::CreateLocalGroup(layout.world());
  testing::ThreadCommFactory stand_ins;
  std::vector<RunResult> per_rank(layout.world());
  std::vector<std::string> errors(layout.world());
  std::vector<std::thread> threads;
  for (int r = 0; r < layout.world(); ++r) {
    threads.emplace_back([&, r] {
      CpuBackend be(1);
      auto t = DistributedTrainer::Create(be, job, layout, *group[r], 20000,
                                          device ? stand_ins.MakerFor(r) : parallel::DeviceCommsMaker());
      if (!t.ok()) {
        errors[r] = t.status().message();
        group[r]->Abort("rank failed");
        return;
      }
      per_rank[r].device_comm = (*t)->device_comm();
      per_rank[r].optimizer_bytes = (*t)->optimizer_state_bytes();
      per_rank[r].pairs_overlapped = (*t)->overlaps_pairs();
      for (int s = 0; s < steps; ++s) {
        auto rep = (*t)->Step();
        if (!rep.ok()) {
          errors[r] = rep.status().message();
          group[r]->Abort("rank failed");
          return;
        }
        per_rank[r].losses.push_back(rep->loss.total);
        per_rank[r].grad_norms.push_back(rep->grad_norm);
        per_rank[r].ep_max_ranks = std::max(per_rank[r].ep_max_ranks, (*t)->timing().ep_max_ranks_per_token);
        per_rank[r].ep_remote_share = (*t)->timing().ep_remote_share;
        if (s == 0 && !zero1) {  // under ZeRO-1 a rank holds only its chunk of the summed gradients
          for (Model* m : (*t)->modules()) {
            Tensors g;
            Collect(m->grads(), g, be);
            MergeCopies(per_rank[r].grads, g, "rank " + std::to_string(r) + "'s gradients");
          }
        }
      }
      auto eval = (*t)->Evaluate();  // forward only: over the links too where the step used them
      if (!eval.ok()) {
        errors[r] = eval.status().message();
        group[r]->Abort("rank failed");
        return;
      }
      per_rank[r].eval = *eval;
      for (Model* m : (*t)->modules()) {
        Tensors p;
        Collect(m->params(), p, be);
        MergeCopies(per_rank[r].params, p, "rank " + std::to_string(r) + "'s weights");
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < layout.world(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  if (device) {
    EXPECT_GT(stand_ins.reductions(), 0) << "no bucket took the device path";
    if (layout.ep > 1) {
      EXPECT_GT(stand_ins.row_exchanges(), 0) << "no expert rows took the device path";
    }
    if (layout.pp > 1) {
      EXPECT_GT(stand_ins.sends(), 0) << "no stage-to-stage transfer took a device link";
    }
  }
  RunResult all;
  all.losses = per_rank[0].losses;
  all.grad_norms = per_rank[0].grad_norms;
  all.ep_max_ranks = per_rank[0].ep_max_ranks;
  all.ep_remote_share = per_rank[0].ep_remote_share;
  all.pairs_overlapped = per_rank[0].pairs_overlapped;
  all.device_comm = per_rank[0].device_comm;
  all.eval = per_rank[0].eval;
  // Routed-expert tensors are shards (ep_rank's share of the experts): kept
  // apart per ep_rank, then joined in expert order.
  auto keyed = [&](const Tensors& tensors, int r) {
    Tensors out;
    for (const auto& [name, v] : tensors)
      out[name.find(".mlp.experts.") == std::string::npos ? name
                                                          : name + "#" + std::to_string(layout.CoordOf(r).ep_rank)] = v;
    return out;
  };
  for (int r = 0; r < layout.world(); ++r) {
    all.optimizer_bytes += per_rank[r].optimizer_bytes;
    EXPECT_EQ(per_rank[r].losses, all.losses) << "rank " << r << " reports other losses";
    MergeCopies(all.params, keyed(per_rank[r].params, r), "the ranks' weights");
    MergeCopies(all.grads, keyed(per_rank[r].grads, r), "the ranks' gradients");
  }
  for (auto* tensors : {&all.params, &all.grads}) {
    Tensors joined;
    for (auto& [k, v] : *tensors) {
      const std::string name = k.substr(0, k.find('#'));
      auto& out = joined[name];
      out.insert(out.end(), v.begin(), v.end());  // "#0" < "#1" < ...: expert order (ep < 10)
    }
    *tensors = std::move(joined);
  }
  return all;
}

double RelativeError(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Losses and gradient norms of every step and the first step's gradients
// agree to 1e-5. Weights after a few steps get 1e-4: AdamW's first steps
// move a weight by about lr * sign(g) whatever |g| is, so fp32 rounding of a
// small gradient moves weights by more than it moves the gradient (the
// single-process fp32 run is itself ~2e-5 from an fp64 run on some tensors).
// A lost or doubled micro-batch, shard or copy is off by 1e-1 or more.
void ExpectSameRun(const RunResult& got, const RunResult& want) {
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (size_t s = 0; s < want.losses.size(); ++s) {
    EXPECT_NEAR(got.losses[s], want.losses[s], 1e-5 * std::abs(want.losses[s])) << "step " << s + 1;
    EXPECT_NEAR(got.grad_norms[s], want.grad_norms[s], 1e-5 * want.grad_norms[s]) << "step " << s + 1;
  }
  EXPECT_NEAR(got.eval, want.eval, 1e-5 * std::abs(want.eval)) << "validation loss";
  ASSERT_EQ(got.params.size(), want.params.size()) << "the ranks together must hold every tensor";
  for (const auto& [name, w] : want.params) {
    ASSERT_TRUE(got.params.count(name)) << name;
    EXPECT_LT(RelativeError(got.params.at(name), w), 1e-4) << "weights of " << name;
    if (name.find("e_score_correction_bias") != std::string::npos || got.grads.empty()) continue;
    EXPECT_LT(RelativeError(got.grads.at(name), want.grads.at(name)), 1e-5) << "gradient of " << name;
  }
}

struct Case {
  int pp, dp;
  const char* schedule;
  bool zero1 = false;
  bool split_w = true;  // zb1p / dualpipe / dualpipev only
  int ep = 1;
  const char* overlap_pairs = "auto";
  bool device = false;  // the device paths (NCCL's, over CPU stand-ins, one thread per communicator at a time)
};

class DistributedEquivalence : public ::testing::TestWithParam<Case> {};

TEST_P(DistributedEquivalence, MatchesTheSingleProcessRun) {
  const Case c = GetParam();
  testing::TempDir dir;
  const JobConfig job = EquivalenceJob(dir.path());
  ParallelConfig par;
  par.pp = c.pp;
  par.dp = c.dp;
  par.schedule = c.schedule;
  par.zero1 = c.zero1;
  par.split_w = c.split_w;
  par.ep = c.ep;
  par.overlap_pairs = c.overlap_pairs;
  auto layout = parallel::PlanLayout(job.model, job.train, par, c.pp * c.dp * c.ep);
  ASSERT_TRUE(layout.ok()) << layout.status().message();
  const RunResult want = RunSingle(job, job.train.steps);
  JobConfig dist = job;
  dist.parallel = par;
  const RunResult got = RunDistributed(dist, *layout, job.train.steps, c.zero1, c.device);
  ExpectSameRun(got, want);
  EXPECT_EQ(got.device_comm, c.device ? "injected" : "host");
  // Pairs ran on two threads exactly where asked ("auto": with ep > 1).
  const bool pairs = std::string(c.schedule).rfind("dualpipe", 0) == 0;
  EXPECT_EQ(got.pairs_overlapped, pairs && parallel::OverlapsPairs(par, *layout));
  if (c.ep > 1) {
    // Device-limited routing: a token's experts lie in at most topk_group
    // groups, and a group never spans two ranks.
    EXPECT_GE(got.ep_max_ranks, 1);
    EXPECT_LE(got.ep_max_ranks, job.model.topk_group);
    EXPECT_GT(got.ep_remote_share, 0.0) << "no token copy travelled: the all-to-all went untested";
  }
  if (c.zero1) {
    // Each trainable element's m and v live on exactly one rank.
    size_t trainable = 0;
    for (const auto& [name, w] : want.params)
      if (name.find("e_score_correction_bias") == std::string::npos) trainable += w.size();
    EXPECT_EQ(got.optimizer_bytes, 2 * sizeof(float) * trainable);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, DistributedEquivalence,
    ::testing::Values(
        Case{1, 2, "1f1b"}, Case{2, 1, "1f1b"}, Case{2, 2, "1f1b"}, Case{4, 1, "1f1b"}, Case{4, 2, "1f1b"},
        Case{2, 1, "dualpipe"}, Case{2, 2, "dualpipe"}, Case{4, 1, "dualpipe"}, Case{4, 2, "dualpipe"},
        Case{2, 1, "dualpipev"}, Case{2, 2, "dualpipev"}, Case{1, 2, "1f1b", true}, Case{2, 2, "1f1b", true},
        Case{4, 2, "dualpipe", true}, Case{2, 2, "dualpipev", true}, Case{2, 1, "zb1p"}, Case{4, 2, "zb1p", true},
        Case{4, 1, "dualpipe", false, false}, Case{2, 2, "dualpipev", false, false}, Case{1, 1, "1f1b", false, true, 2},
        Case{2, 1, "1f1b", false, true, 2}, Case{2, 2, "dualpipe", true, true, 2}, Case{4, 1, "zb1p", true, true, 2},
        Case{2, 1, "dualpipev", false, true, 2}, Case{4, 2, "dualpipe", true, true, 1, "on"},
        Case{2, 1, "dualpipev", false, false, 1, "on"}, Case{2, 2, "dualpipe", true, true, 2, "off"},
        Case{1, 2, "1f1b", false, true, 1, "auto", true}, Case{4, 2, "dualpipe", true, true, 1, "auto", true},
        Case{2, 2, "dualpipe", true, true, 2, "off", true}, Case{2, 1, "dualpipev", false, true, 2, "off", true},
        Case{1, 1, "1f1b", true, true, 2, "auto", true}, Case{2, 2, "1f1b", false, true, 1, "auto", true},
        Case{4, 1, "zb1p", false, true, 1, "auto", true}, Case{2, 2, "dualpipe", true, true, 2, "auto", true},
        Case{2, 1, "dualpipev", false, true, 2, "on", true}, Case{4, 1, "dualpipe", false, true, 2, "auto", true}),
    [](const auto& info) {
      return std::string(info.param.schedule) + "_pp" + std::to_string(info.param.pp) + "_dp" +
             std::to_string(info.param.dp) + (info.param.zero1 ? "_zero1" : "") + (info.param.split_w ? "" : "_fused") +
             (info.param.ep > 1 ? "_ep" + std::to_string(info.param.ep) : "") +
             (std::string(info.param.overlap_pairs) == "auto" ? ""
                                                              : std::string("_pairs_") + info.param.overlap_pairs) +
             (info.param.device ? "_device" : "");
    });

// The equivalence job on two stages, for the tests that play a rank by hand.
Expected<Layout> TwoStages(const JobConfig& job) {
  ParallelConfig par;
  par.pp = 2;
  return parallel::PlanLayout(job.model, job.train, par, 2);
}

// Ranks that read different configs (a file edited while they started)
// are refused at start, on every rank, naming the ones that differ: the
// NCCL paths would not notice mismatched sizes.
TEST(DistributedTrainer, RanksOfDifferentJobsAreRefusedAtStart) {
  testing::TempDir dir;
  const JobConfig job = EquivalenceJob(dir.path());
  auto layout = TwoStages(job);
  ASSERT_TRUE(layout.ok()) << layout.status().message();
  auto group = parallel::CreateLocalGroup(2);
  std::vector<Status> made(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      JobConfig mine = job;
      mine.toml_text = r == 0 ? "[train]\nseq_len = 16\n" : "[train]\nseq_len = 32\n";
      CpuBackend be(1);
      auto t = DistributedTrainer::Create(be, mine, *layout, *group[r], 20000);
      made[r] = t.status();
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_TRUE(made[0].IsInvalidArgument()) << made[0].message();
  EXPECT_NE(made[0].message().find("rank(s) 1 run another job than rank 0"), std::string::npos) << made[0].message();
  EXPECT_NE(made[1].message().find("rank(s) 0 run another job than rank 1"), std::string::npos) << made[1].message();
}

// Plays rank 0's part of the start-up job check: echoes rank 1's fingerprint.
void EchoJobCheck(parallel::ProcessGroup& rank0) {
  auto job_check = rank0.Recv(1, parallel::Tag(parallel::TagKind::kJobCheck), 20000);
  ASSERT_TRUE(job_check.ok()) << job_check.status().message();
  ASSERT_TRUE(rank0.Send(1, parallel::Tag(parallel::TagKind::kJobCheck), *job_check).ok());
}

// A peer that sends an activation of the wrong size (a bug or an attacker
// with a key) fails the step with Corruption naming it; nothing is read
// past the message.
TEST(DistributedTrainer, AMisSizedActivationIsRefused) {
  testing::TempDir dir;
  const JobConfig job = EquivalenceJob(dir.path());
  auto layout = TwoStages(job);
  ASSERT_TRUE(layout.ok()) << layout.status().message();
  auto group = parallel::CreateLocalGroup(2);
  std::thread impostor([&] {  // plays rank 0: echoes rank 1's job check, joins the step's barrier, sends 3 bytes
    EchoJobCheck(*group[0]);
    ASSERT_TRUE(parallel::Barrier(*group[0], {0, 1}, parallel::Tag(parallel::TagKind::kBarrier), 20000).ok());
    ASSERT_TRUE(group[0]->Send(1, parallel::ChunkTag(parallel::TagKind::kActivation, 0, 1), {1, 2, 3}).ok());
  });
  CpuBackend be(1);
  auto t = DistributedTrainer::Create(be, job, *layout, *group[1], 20000);
  ASSERT_TRUE(t.ok()) << t.status().message();
  auto step = (*t)->Step();
  impostor.join();
  ASSERT_FALSE(step.ok());
  EXPECT_TRUE(step.status().IsCorruption()) << step.status().message();
  EXPECT_NE(step.status().message().find("activation for micro-batch 0 stage 1 from rank 0 has 3 bytes"),
            std::string::npos)
      << step.status().message();
}

// In an F&B pair on two threads, the lane that fails stops the other at
// once: rank 1 of DualPipe pp=2 runs F1+B2' as a pair; its F1 gets a
// mis-sized activation while B2' waits for a gradient that never comes. The
// step fails with F1's error long before B2's 30 s receive timeout.
TEST(DistributedTrainer, AFailingLaneOfAPairStopsTheOtherAtOnce) {
  testing::TempDir dir;
  const JobConfig job = EquivalenceJob(dir.path());
  ParallelConfig par;
  par.pp = 2;
  par.schedule = "dualpipe";
  par.micro_batches = 4;
  par.overlap_pairs = "on";
  auto layout = parallel::PlanLayout(job.model, job.train, par, 2);
  ASSERT_TRUE(layout.ok()) << layout.status().message();
  JobConfig dist = job;
  dist.parallel = par;
  auto group = parallel::CreateLocalGroup(2);
  CpuBackend be(1);
  std::thread echo([&] { EchoJobCheck(*group[0]); });
  auto t = DistributedTrainer::Create(be, dist, *layout, *group[1], 30000);
  echo.join();
  ASSERT_TRUE(t.ok()) << t.status().message();
  ASSERT_TRUE((*t)->overlaps_pairs());
  const size_t activation = (*t)->modules()[0]->StageInput(0).bytes();  // rank 1's module 0 is stage 1
  std::thread impostor([&] {  // plays rank 0: a good activation for F0, a 3-byte one for F1, no gradients
    ASSERT_TRUE(parallel::Barrier(*group[0], {0, 1}, parallel::Tag(parallel::TagKind::kBarrier), 30000).ok());
    ASSERT_TRUE(
        group[0]
            ->Send(1, parallel::ChunkTag(parallel::TagKind::kActivation, 0, 1), std::vector<uint8_t>(activation, 0))
            .ok());
    ASSERT_TRUE(group[0]->Send(1, parallel::ChunkTag(parallel::TagKind::kActivation, 1, 1), {1, 2, 3}).ok());
  });
  const auto start = std::chrono::steady_clock::now();
  auto step = (*t)->Step();
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  impostor.join();
  ASSERT_FALSE(step.ok());
  EXPECT_TRUE(step.status().IsCorruption()) << step.status().message();
  EXPECT_NE(step.status().message().find("activation for micro-batch 1 stage 1 from rank 0 has 3 bytes"),
            std::string::npos)
      << step.status().message();
  EXPECT_LT(took, 15.0) << "the waiting lane sat out its receive timeout";
}

}  // namespace
}  // namespace troupe
