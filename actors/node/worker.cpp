// A worker (one per device) and the trainer runner it spawns per attempt.
//
//   idle ──JobAssign──▶ training ──last step / StopJob / error──▶ idle
//
// The Trainer runs in a detached actor (its own thread): a step may take
// seconds and must never block the actor scheduler. It checks the stop flag
// between steps. A new attempt starts only once the previous runner is
// down, so the two never hold the device, or a checkpoint folder, at once.
#include <spdlog/spdlog.h>

#include "actors/node/node_actors.h"
#include "actors/node/step_report.h"
#include "configs/config.h"
#include "gpu/cpu/cpu_backend.h"
#include "gpu/cuda/cuda_info.h"
#include "train/parallel/process_group.h"
#include "train/trainer.h"

namespace troupe::node {

using protocol::JobAssign;
using protocol::RankAddress;
using protocol::RankTable;
using protocol::restore_atom;
using protocol::restore_atom_v;
using protocol::save_atom;
using protocol::save_atom_v;
using protocol::StepReport;
using protocol::stop_atom;
using protocol::stop_atom_v;
using protocol::StopJob;

namespace {

// Waits for the storage actor's answer to a save; false on timeout.
bool AwaitSaved(caf::blocking_actor* self, const JobAssign& job, std::chrono::seconds timeout) {
  bool answered = false;
  self->receive(
      [&](save_atom, const std::string& id, const std::string& error) {
        answered = true;
        if (error.empty()) {
          spdlog::info("worker {}: checkpoint {} written here, replicas on their way", job.worker, id);
        } else {
          spdlog::warn("worker {}: checkpoint {} not saved: {}", job.worker, id.empty() ? "(no id)" : id, error);
        }
      },
      caf::after(timeout) >> [] {});
  return answered;
}

// Polls for a finished save without waiting.
bool PollSaved(caf::blocking_actor* self, const JobAssign& job) {
  return AwaitSaved(self, job, std::chrono::seconds(0));
}

}  // namespace

StepReport ReportOfStep(const troupe::StepReport& step, int total_steps) {
  StepReport rep;
  rep.step = step.step;
  rep.total_steps = total_steps;
  rep.loss = step.loss.total;
  rep.main_loss = step.loss.main;
  rep.lr = step.lr;
  rep.grad_norm = step.grad_norm;
  rep.tokens_per_s = step.seconds > 0 ? step.tokens / step.seconds : 0;
  rep.done = step.step == total_steps;
  return rep;
}

void RunControl::Stop(const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_.exchange(true)) return;
  why_ = why;
  if (group_) group_->Abort("stopped: " + why);
}

void RunControl::SetGroup(parallel::ProcessGroup* group) {
  std::lock_guard<std::mutex> lock(mu_);
  group_ = group;
  if (group_ && stopped_) group_->Abort("stopped: " + why_);
}

Expected<std::unique_ptr<Backend>> MakeWorkerBackend(const WorkerDevice& device, const TrainConfig& tc, int worker,
                                                     int cpu_threads) {
  if (device.kind == "cuda") {
    if (tc.device == "cpu")
      return Status::InvalidArgument("the job wants device cpu but worker " + std::to_string(worker) + " is a GPU");
    TROUPE_ASSIGN_OR_RETURN(auto be, CreateCudaBackend(device.index, /*bf16=*/false));
    return std::unique_ptr<Backend>(std::move(be));
  }
  if (tc.device == "cuda")
    return Status::InvalidArgument("the job wants device cuda but worker " + std::to_string(worker) + " is a CPU slot");
  return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(cpu_threads > 0 ? cpu_threads : tc.threads));
}

void TrainerRunner(caf::blocking_actor* self, JobAssign job, WorkerDevice device, worker_actor worker,
                   storage_actor storage, std::shared_ptr<RunControl> control, int cpu_threads) {
  auto fail = [&](const std::string& msg) {
    StepReport r;
    r.attempt = job.attempt;
    r.worker = job.worker;
    r.error = msg;
    self->send(worker, r);
  };
  auto cfg = ParseConfigText(job.toml_text, job.config_name);
  if (!cfg.ok()) return fail("config: " + cfg.status().message());
  const TrainConfig& tc = cfg->train;
  auto backend_or = MakeWorkerBackend(device, tc, job.worker, cpu_threads);
  if (!backend_or.ok()) return fail(backend_or.status().message());
  std::unique_ptr<Backend> backend = std::move(backend_or).value();
  auto trainer = Trainer::Create(*backend, *cfg);
  if (!trainer.ok()) return fail(trainer.status().message());
  if (!job.resume_manifest.empty()) {
    if (!storage) return fail("cannot resume: this node was started without --data, so it has no shard store");
    self->send(storage, restore_atom_v, job, caf::actor_cast<caf::actor>(self));
    std::string error = "the storage actor did not answer the restore";
    protocol::SnapshotPtr snap;
    self->receive(
        [&](restore_atom, protocol::SnapshotPtr& s, std::string& e) { snap = std::move(s), error = std::move(e); },
        caf::after(std::chrono::seconds(180)) >> [] {});
    if (!error.empty()) return fail("resume: " + error);
    if (Status r = (*trainer)->Restore(*snap); !r.ok()) return fail("resume: " + r.message());
    spdlog::info("worker {}: attempt {} resumed at step {}", job.worker, job.attempt, (*trainer)->step());
  }
  const CheckpointConfig& ck = cfg->checkpoint;
  const bool saving = ck.every > 0 && storage;
  if (ck.every > 0 && !storage)
    spdlog::warn("worker {}: checkpoint.every = {} but this node has no --data dir: no checkpoints", job.worker,
                 ck.every);
  if (saving) {
    // The staging arena now, not as the first save's stall.
    if (Status st = (*trainer)->PrepareCapture(); !st.ok()) return fail("checkpoint capture: " + st.message());
  }
  bool save_in_flight = false;
  spdlog::info("worker {}: attempt {} started ({} steps)", job.worker, job.attempt, tc.steps);
  for (int s = (*trainer)->step(); s < tc.steps; ++s) {
    if (control->stopped()) {
      spdlog::info("worker {}: attempt {} stopped at step {}", job.worker, job.attempt, s);
      return;
    }
    auto r = (*trainer)->Step();
    if (!r.ok()) return fail(r.status().message());
    StepReport rep = ReportOfStep(*r, tc.steps);
    rep.attempt = job.attempt;
    rep.worker = job.worker;
    if ((tc.eval_every > 0 && r->step % tc.eval_every == 0) || rep.done) {
      auto val = (*trainer)->Evaluate();
      if (!val.ok()) return fail(val.status().message());
      rep.val_loss = *val;
      rep.unigram_baseline = (*trainer)->unigram_baseline();
    }
    self->send(worker, rep);
    if (save_in_flight && PollSaved(self, job)) save_in_flight = false;
    if (saving && r->step % ck.every == 0 && !rep.done) {
      // One staging copy: the next capture waits for the previous save's
      // own copy (the replicas' copies are in flight by then).
      if (save_in_flight && !AwaitSaved(self, job, std::chrono::seconds(300)))
        return fail("checkpoint: the storage actor did not finish the previous save within 300 s");
      auto snap = (*trainer)->Capture(CheckpointMetrics(*r, ValLossOf(rep)));
      if (!snap.ok()) return fail("checkpoint capture: " + snap.status().message());
      self->send(storage, save_atom_v, job.attempt, std::make_shared<ckpt::Snapshot>(std::move(snap).value()),
                 caf::actor_cast<caf::actor>(self));
      save_in_flight = true;
    }
  }
  spdlog::info("worker {}: attempt {} finished", job.worker, job.attempt);
}

namespace {

using WorkerSelf = worker_actor::stateful_pointer<WorkerState>;

void Launch(WorkerSelf self, const JobAssign& j) {
  auto& st = self->state;
  if (j.ranked) {
    st.runner = self->spawn<caf::detached>(RankRunner, j, st.device, worker_actor(self), st.control, st.cpu_threads,
                                           st.rank_host);
  } else {
    st.runner = self->spawn<caf::detached>(TrainerRunner, j, st.device, worker_actor(self), st.storage, st.control,
                                           st.cpu_threads);
  }
  self->monitor(st.runner);
}

void StopCurrent(WorkerSelf self, const std::string& why) {
  auto& st = self->state;
  if (st.control) st.control->Stop(why);
  st.control.reset();
  st.pending.reset();
  st.attempt = 0;
}

}  // namespace

worker_actor::behavior_type Worker(WorkerSelf self, int index, WorkerDevice device, agent_actor agent,
                                   storage_actor storage, int cpu_threads, std::string rank_host) {
  self->state.index = index;
  self->state.device = std::move(device);
  self->state.agent = agent;
  self->state.cpu_threads = cpu_threads;
  self->state.storage = storage;
  self->state.rank_host = std::move(rank_host);
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (dm.source != st.runner.address()) return;
    st.runner = nullptr;
    if (st.pending) {
      const JobAssign next = *st.pending;
      st.pending.reset();
      Launch(self, next);
    }
  });
  return {
      [=](const JobAssign& j) {
        auto& st = self->state;
        StopCurrent(self, "attempt " + std::to_string(j.attempt) + " replaces it");
        st.attempt = j.attempt;
        st.control = std::make_shared<RunControl>();
        if (st.runner) {
          st.pending = j;  // the previous runner is still ending: it may hold the device or a checkpoint folder
        } else {
          Launch(self, j);
        }
      },
      [=](const StopJob& s) {
        if (s.attempt == self->state.attempt) {
          spdlog::info("worker {}: stopping attempt {} ({})", self->state.index, s.attempt, s.reason);
          StopCurrent(self, s.reason);
        }
      },
      [=](StepReport& r) {
        auto& st = self->state;
        if (r.attempt != st.attempt) return;  // a runner told to stop
        // A distributed attempt's other ranks go on after one of them is done.
        if (!r.error.empty() || (r.done && r.rank == 0)) {
          st.attempt = 0;
          st.control.reset();
        }
        self->send(st.agent, std::move(r));
      },
      [=](RankAddress& a) {
        if (a.attempt == self->state.attempt) self->send(self->state.agent, std::move(a));
      },
      [=](RankTable& t) {
        auto& st = self->state;
        if (t.attempt == st.attempt && st.runner && !st.pending) caf::anon_send(st.runner, std::move(t));
      },
      [=](stop_atom) {
        StopCurrent(self, "the node is shutting down");
        self->quit();
      },
  };
}

}  // namespace troupe::node
