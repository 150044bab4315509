// A worker (one per device) and the trainer runner it spawns per attempt.
//
//   idle ──JobAssign──▶ training ──last step / StopJob / error──▶ idle
//
// The Trainer runs in a detached actor (its own thread): a step may take
// seconds and must never block the actor scheduler. It checks `stop`
// between steps.
#include <spdlog/spdlog.h>

#include "actors/node/node_actors.h"
#include "configs/config.h"
#include "gpu/cpu/cpu_backend.h"
#include "gpu/cuda/cuda_info.h"
#include "train/trainer.h"

namespace troupe::node {

using protocol::JobAssign;
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

void TrainerRunner(caf::blocking_actor* self, JobAssign job, WorkerDevice device, worker_actor worker,
                   storage_actor storage, std::shared_ptr<std::atomic<bool>> stop, int cpu_threads) {
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
  // The worker's device decides; a config that insists on the other kind is an error.
  std::unique_ptr<Backend> backend;
  if (device.kind == "cuda") {
    if (tc.device == "cpu")
      return fail("the job wants device cpu but worker " + std::to_string(job.worker) + " is a GPU");
    auto be = CreateCudaBackend(device.index, /*bf16=*/false);
    if (!be.ok()) return fail(be.status().message());
    backend = std::move(be).value();
  } else {
    if (tc.device == "cuda")
      return fail("the job wants device cuda but worker " + std::to_string(job.worker) + " is a CPU slot");
    backend = std::make_unique<CpuBackend>(cpu_threads > 0 ? cpu_threads : tc.threads);
  }
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
    if (stop->load()) {
      spdlog::info("worker {}: attempt {} stopped at step {}", job.worker, job.attempt, s);
      return;
    }
    auto r = (*trainer)->Step();
    if (!r.ok()) return fail(r.status().message());
    StepReport rep;
    rep.attempt = job.attempt;
    rep.worker = job.worker;
    rep.step = r->step;
    rep.total_steps = tc.steps;
    rep.loss = r->loss.total;
    rep.main_loss = r->loss.main;
    rep.lr = r->lr;
    rep.grad_norm = r->grad_norm;
    rep.tokens_per_s = r->seconds > 0 ? r->tokens / r->seconds : 0;
    rep.done = r->step == tc.steps;
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
      std::map<std::string, double> metrics{{"loss", rep.loss},
                                            {"main_loss", rep.main_loss},
                                            {"lr", rep.lr},
                                            {"grad_norm", rep.grad_norm},
                                            {"tokens_per_s", rep.tokens_per_s}};
      if (rep.val_loss >= 0) metrics["val_loss"] = rep.val_loss;
      auto snap = (*trainer)->Capture(metrics);
      if (!snap.ok()) return fail("checkpoint capture: " + snap.status().message());
      self->send(storage, save_atom_v, job.attempt, std::make_shared<ckpt::Snapshot>(std::move(snap).value()),
                 caf::actor_cast<caf::actor>(self));
      save_in_flight = true;
    }
  }
  spdlog::info("worker {}: attempt {} finished", job.worker, job.attempt);
}

worker_actor::behavior_type Worker(worker_actor::stateful_pointer<WorkerState> self, int index, WorkerDevice device,
                                   agent_actor agent, storage_actor storage, int cpu_threads) {
  self->state.index = index;
  self->state.device = std::move(device);
  self->state.agent = agent;
  self->state.cpu_threads = cpu_threads;
  self->state.storage = storage;
  auto stop_current = [self] {
    if (self->state.stop) self->state.stop->store(true);
    self->state.stop.reset();
    self->state.attempt = 0;
  };
  return {
      [=](const JobAssign& j) {
        stop_current();
        self->state.attempt = j.attempt;
        self->state.stop = std::make_shared<std::atomic<bool>>(false);
        self->spawn<caf::detached>(TrainerRunner, j, self->state.device, worker_actor(self), self->state.storage,
                                   self->state.stop, self->state.cpu_threads);
      },
      [=](const StopJob& s) {
        if (s.attempt == self->state.attempt) {
          spdlog::info("worker {}: stopping attempt {} ({})", self->state.index, s.attempt, s.reason);
          stop_current();
        }
      },
      [=](StepReport& r) {
        if (r.attempt != self->state.attempt) return;  // a runner told to stop
        if (r.done || !r.error.empty()) {
          self->state.attempt = 0;
          self->state.stop.reset();
        }
        self->send(self->state.agent, std::move(r));
      },
      [=](stop_atom) {
        stop_current();
        self->quit();
      },
  };
}

}  // namespace troupe::node
