// The rank runner: one rank of a distributed job, running its pipeline
// stages (DistributedTrainer) in a detached actor, off the scheduler's
// threads. Its process group reaches the other ranks' runners directly
// (CURVE ZeroMQ, keys made per attempt); the coordinator only tells them
// where the others listen.
//
//   worker ──JobAssign{rank, world, dp}──▶ rank runner
//   rank runner ──RankAddress{round 0: endpoint, key}──▶ worker ─▶ agent ─▶ coordinator
//   coordinator, once every rank's is in ──RankTable{round 0: all}──▶ each rank runner
//   (the same again for round 1: "my server admits every key")
//   rank runner: steps; rank 0 reports each, any rank its failure
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <thread>

#include "actors/node/node_actors.h"
#include "actors/node/step_report.h"
#include "train/parallel/dist_checkpoint.h"
#include "train/parallel/dist_trainer.h"
#include "train/parallel/process_group.h"

namespace troupe::node {

using protocol::JobAssign;
using protocol::RankAddress;
using protocol::RankTable;
using protocol::StepReport;

namespace {

// How long a rank waits for a peer's message in a step. A dead peer is
// normally noticed sooner: the coordinator stops the attempt when its node
// misses heartbeats, and the stop aborts this rank's group.
constexpr int kPeerTimeoutMs = 120000;
// The process group's connections, once every rank is ready. The waits for
// the other ranks before that (the rendezvous) have no deadline and end on
// a stop instead: a rank may start late while its worker's previous runner
// finishes a checkpoint write.
constexpr int kConnectTimeoutMs = 60000;
// A rank repeats its rendezvous entry this often until its table comes
// (frames are dropped while a node reconnects to the coordinator).
constexpr auto kRendezvousRepeat = std::chrono::seconds(2);

// The ranks' rendezvous through the coordinator (parallel::Rendezvous).
class CoordinatorRendezvous final : public parallel::Rendezvous {
 public:
  CoordinatorRendezvous(caf::blocking_actor* self, worker_actor worker, const JobAssign& job, const RunControl& control)
      : self_(self), worker_(std::move(worker)), attempt_(job.attempt), worker_index_(job.worker), control_(control) {}

  Status Publish(int rank, const parallel::PeerAddress& address) override {
    entry_ = RankAddress{"", attempt_, rank, 0, address.endpoint, address.public_key, worker_index_};
    self_->send(worker_, entry_);
    return Status::Ok();
  }

  Expected<std::vector<parallel::PeerAddress>> WaitForAll(int size, int timeout_ms) override {
    TROUPE_ASSIGN_OR_RETURN(RankTable t, Await(0, timeout_ms));
    if (static_cast<int>(t.endpoints.size()) != size || static_cast<int>(t.public_keys.size()) != size)
      return Status::Corruption("the coordinator's rank table has " + std::to_string(t.endpoints.size()) +
                                " addresses and " + std::to_string(t.public_keys.size()) + " keys for " +
                                std::to_string(size) + " ranks");
    std::vector<parallel::PeerAddress> out;
    for (int r = 0; r < size; ++r) out.push_back({t.endpoints[r], t.public_keys[r]});
    return out;
  }

  Status MarkReady(int rank) override {
    entry_.round = 1;  // with the round-0 address: a restarted coordinator learns it from here
    self_->send(worker_, entry_);
    return Status::Ok();
  }

  Status WaitAllReady(int /*size*/, int timeout_ms) override { return Await(1, timeout_ms).status(); }

 private:
  // The table of `round`. No deadline: the coordinator knows whether the
  // other ranks' nodes live and stops this attempt when one does not; the
  // wait is in short slices so that the stop is seen.
  Expected<RankTable> Await(int round, int /*timeout_ms*/) {
    auto next_repeat = std::chrono::steady_clock::now() + kRendezvousRepeat;
    std::optional<RankTable> got;
    while (!got) {
      if (control_.stopped()) return Status::IOError("stopped during the rendezvous");
      if (std::chrono::steady_clock::now() >= next_repeat) {
        self_->send(worker_, entry_);
        next_repeat += kRendezvousRepeat;
      }
      self_->receive(
          [&](RankTable& t) {
            if (t.attempt == attempt_ && t.round == round) got = std::move(t);
          },
          caf::after(std::chrono::milliseconds(100)) >> [] {});
    }
    return std::move(*got);
  }

  caf::blocking_actor* self_;
  worker_actor worker_;
  uint64_t attempt_;
  int32_t worker_index_;
  const RunControl& control_;
  RankAddress entry_;  // this rank's entry of the round in progress
};

// Clears the control's pointer to the group before the group goes.
struct GroupRegistration {
  RunControl& control;
  ~GroupRegistration() { control.SetGroup(nullptr); }
};

}  // namespace

void RankRunner(caf::blocking_actor* self, JobAssign job, WorkerDevice device, worker_actor worker,
                std::shared_ptr<RunControl> control, int cpu_threads, std::string rank_host) {
  const std::string me = "rank " + std::to_string(job.rank) + " of " + std::to_string(job.world);
  auto report = [&](StepReport r) {
    r.attempt = job.attempt;
    r.worker = job.worker;
    r.rank = job.rank;
    self->send(worker, std::move(r));
  };
  // A stopped attempt's errors (its group aborted under it) are nobody's news.
  auto fail = [&](const Status& s) {
    if (control->stopped()) return;
    spdlog::error("worker {}: {} of attempt {} failed: {}", job.worker, me, job.attempt, s.message());
    StepReport r;
    r.error = s.message();
    report(std::move(r));
  };
  auto cfg = ParseConfigText(job.toml_text, job.config_name);
  if (!cfg.ok()) return fail(cfg.status().WithContext("config"));
  TrainConfig& tc = cfg->train;
  if (cpu_threads <= 0 && tc.threads <= 0)
    cpu_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / job.world);
  // The layout the coordinator planned: its dp, on exactly `world` workers.
  cfg->parallel.dp = job.dp;
  auto layout = parallel::PlanLayout(cfg->model, tc, cfg->parallel, job.world);
  if (!layout.ok()) return fail(layout.status());
  if (layout->world() != job.world)
    return fail(Status::InvalidArgument("the planned layout has " + std::to_string(layout->world()) +
                                        " ranks, the attempt " + std::to_string(job.world)));
  auto backend = MakeWorkerBackend(device, tc, job.worker, cpu_threads);
  if (!backend.ok()) return fail(backend.status());
  auto key = transport::GenerateKeyPair();
  if (!key.ok()) return fail(key.status());
  CoordinatorRendezvous rendezvous(self, worker, job, *control);
  auto group =
      parallel::CreateZmqGroup(job.rank, job.world, *key, "tcp://" + rank_host + ":0", rendezvous, kConnectTimeoutMs);
  if (!group.ok()) return fail(group.status().WithContext(me));
  control->SetGroup(group->get());
  GroupRegistration registered{*control};
  auto trainer = parallel::DistributedTrainer::Create(**backend, *cfg, *layout, **group, kPeerTimeoutMs);
  if (!trainer.ok()) return fail(trainer.status().WithContext(me));
  parallel::DistributedTrainer& t = **trainer;
  std::unique_ptr<parallel::DistCheckpointer> ckpt;
  const bool saving = cfg->checkpoint.every > 0 && !job.checkpoint_dir.empty();
  if (saving || !job.resume_id.empty()) {
    if (job.checkpoint_dir.empty()) return fail(Status::InvalidArgument("resume without a checkpoint folder"));
    auto c = parallel::DistCheckpointer::Open(job.checkpoint_dir, cfg->checkpoint, **group, kPeerTimeoutMs);
    if (!c.ok()) return fail(c.status().WithContext(me + " checkpoints"));
    ckpt = std::move(c).value();
  }
  if (!job.resume_id.empty()) {
    ckpt::ReadStats stats;
    auto m = ckpt->Resume(job.resume_id, t, &stats);
    if (!m.ok()) return fail(m.status().WithContext(me + " resume from " + job.resume_id));
    spdlog::info("worker {}: {} of attempt {} resumed from {} at step {} ({} shards read)", job.worker, me, job.attempt,
                 m->id, t.step(), stats.shards_read);
  }
  spdlog::info("worker {}: {} of attempt {} started ({} steps)", job.worker, me, job.attempt, tc.steps);
  // Rank 0 tells the coordinator about each commit with its next report.
  std::string committed;
  int committed_step = 0;
  auto take_result = [&](std::optional<SaveResult> done) {
    if (!done) return;
    if (!done->status.ok()) {
      // A save that failed is not fatal: training goes on, the previous checkpoint stays the newest.
      spdlog::warn("worker {}: {} checkpoint not saved: {}", job.worker, me, done->status.message());
      return;
    }
    committed = done->manifest.id;
    committed_step = static_cast<int>(done->manifest.step);
  };
  while (t.step() < tc.steps) {
    if (control->stopped()) return;
    auto r = t.Step();
    if (!r.ok()) return fail(r.status().WithContext(me));
    StepReport rep = ReportOfStep(*r, tc.steps);
    if ((tc.eval_every > 0 && r->step % tc.eval_every == 0) || rep.done) {
      auto val = t.Evaluate();  // collective
      if (!val.ok()) return fail(val.status().WithContext(me + " evaluation"));
      rep.val_loss = *val;
    }
    if (ckpt) {
      take_result(ckpt->Poll());
      if (saving && r->step % cfg->checkpoint.every == 0 && !rep.done) {
        take_result(ckpt->WaitIdle());
        std::string skipped;
        Status st = ckpt->Save(t, CheckpointMetrics(*r, ValLossOf(rep)), &skipped);  // collective
        if (!st.ok()) return fail(st.WithContext(me + " checkpoint"));
        if (!skipped.empty())
          spdlog::warn("worker {}: checkpoint at step {} skipped: {}", job.worker, r->step, skipped);
      }
      if (rep.done) take_result(ckpt->WaitIdle());
    }
    if (job.rank == 0) {
      rep.checkpoint_id = std::exchange(committed, "");
      rep.checkpoint_step = committed_step;
      report(std::move(rep));
    }
  }
  spdlog::info("worker {}: {} of attempt {} finished", job.worker, me, job.attempt);
}

}  // namespace troupe::node
