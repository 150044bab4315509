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
using protocol::StepReport;
using protocol::StopJob;
using protocol::stop_atom;
using protocol::stop_atom_v;

void TrainerRunner(caf::blocking_actor* self, JobAssign job, WorkerDevice device, worker_actor worker,
                   std::shared_ptr<std::atomic<bool>> stop, int cpu_threads) {
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
    if (tc.device == "cpu") return fail("the job wants device cpu but worker " + std::to_string(job.worker) + " is a GPU");
    auto be = CreateCudaBackend(device.index, /*bf16=*/false);
    if (!be.ok()) return fail(be.status().message());
    backend = std::move(be).value();
  } else {
    if (tc.device == "cuda") return fail("the job wants device cuda but worker " + std::to_string(job.worker) + " is a CPU slot");
    backend = std::make_unique<CpuBackend>(cpu_threads > 0 ? cpu_threads : tc.threads);
  }
  auto trainer = Trainer::Create(*backend, *cfg);
  if (!trainer.ok()) return fail(trainer.status().message());
  spdlog::info("worker {}: attempt {} started ({} steps)", job.worker, job.attempt, tc.steps);
  for (int s = 0; s < tc.steps; ++s) {
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
  }
  spdlog::info("worker {}: attempt {} finished", job.worker, job.attempt);
}

worker_actor::behavior_type Worker(worker_actor::stateful_pointer<WorkerState> self, int index, WorkerDevice device,
                                   agent_actor agent, int cpu_threads) {
  self->state.index = index;
  self->state.device = std::move(device);
  self->state.agent = agent;
  self->state.cpu_threads = cpu_threads;
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
        self->spawn<caf::detached>(TrainerRunner, j, self->state.device, worker_actor(self), self->state.stop, self->state.cpu_threads);
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
