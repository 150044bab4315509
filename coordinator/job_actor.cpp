// The job actor: JobTracker + StateStore; assigns the job to a worker,
// collects step reports, reassigns when the worker's node is lost.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "configs/config.h"
#include "coordinator/actors.h"

namespace troupe::cluster {
namespace {

using namespace protocol;
using json = nlohmann::json;
using Self = job_actor::stateful_pointer<JobActorState>;

void Save(Self self) {
  self->state.last_save = std::chrono::steady_clock::now();
  Status s = self->state.store->SaveJob(self->state.tracker->record());
  if (!s.ok()) spdlog::error("job: could not persist the job record: {}", s.message());
}

json Num(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

json JobJson(const JobRecord& r) {
  json hist = json::array();
  for (const LossPoint& p : r.history)
    hist.push_back({{"step", p.step},
                    {"loss", Num(p.loss)},
                    {"main_loss", Num(p.main_loss)},
                    {"val_loss", p.val_loss >= 0 ? Num(p.val_loss) : json(nullptr)},
                    {"tokens_per_s", Num(p.tokens_per_s)}});
  return {{"config_name", r.config_name},
          {"config_path", r.config_path},
          {"state", JobStateName(r.state)},
          {"attempt", r.attempt},
          {"node_id", r.node_id},
          {"worker", r.worker},
          {"step", r.step},
          {"total_steps", r.total_steps},
          {"loss", Num(r.loss)},
          {"main_loss", Num(r.main_loss)},
          {"lr", Num(r.lr)},
          {"grad_norm", Num(r.grad_norm)},
          {"tokens_per_s", Num(r.tokens_per_s)},
          {"val_loss", r.val_loss >= 0 ? Num(r.val_loss) : json(nullptr)},
          {"interruptions", r.interruptions},
          {"message", r.message},
          {"history", hist}};
}

// Gives the job to the first free worker of a live node, if it needs one.
void TryAssign(Self self) {
  auto& st = self->state;
  if (!st.tracker->NeedsWorker()) return;
  std::vector<WorkerSlot> slots;
  for (const auto& [id, n] : st.workers)
    if (n > 0 && st.nodes.count(id)) slots.push_back({id, 0});
  auto slot = st.tracker->Assign(slots);
  if (!slot) return;
  const JobRecord& r = st.tracker->record();
  spdlog::info("job: attempt {} of '{}' assigned to node {} worker {}", r.attempt, r.config_name, slot->node_id,
               slot->worker);
  std::printf("job: attempt %llu on node %s worker %d\n", static_cast<unsigned long long>(r.attempt),
              slot->node_id.c_str(), slot->worker);
  std::fflush(stdout);
  self->send(st.nodes[slot->node_id], JobAssign{r.attempt, slot->worker, r.config_name, r.toml_text});
  Save(self);
}

}  // namespace

job_actor::behavior_type JobActor(Self self, JobRecord record, std::shared_ptr<StateStore> store) {
  if (auto cfg = ParseConfigText(record.toml_text, record.config_path); cfg.ok())
    self->state.log_every = std::max(1, cfg->train.log_every);
  self->state.tracker = std::make_unique<JobTracker>(std::move(record));
  self->state.store = std::move(store);
  Save(self);
  return {
      [=](node_up_atom, const std::string& id, node_actor handle, int32_t workers) {
        self->state.nodes[id] = handle;
        self->state.workers[id] = workers;
        TryAssign(self);
      },
      [=](node_down_atom, const std::string& id, const std::string& why) {
        auto& st = self->state;
        const JobRecord& r = st.tracker->record();
        const uint64_t attempt = r.attempt;
        const int worker = r.worker;
        if (st.tracker->OnNodeLost(id, why)) {
          spdlog::warn("job: {}", st.tracker->record().message);
          std::printf("job: interrupted: %s\n", st.tracker->record().message.c_str());
          std::fflush(stdout);
          // A draining node is alive: tell its worker to stop the lost attempt.
          auto it = st.nodes.find(id);
          if (it != st.nodes.end()) self->send(it->second, StopJob{attempt, worker, why});
          Save(self);
        }
        st.nodes.erase(id);
        st.workers.erase(id);
        TryAssign(self);
      },
      [=](StepReport& m) {
        auto& st = self->state;
        StepUpdate u{m.attempt, m.step, m.total_steps, m.loss, m.main_loss, m.lr, m.grad_norm, m.tokens_per_s,
                     m.val_loss, m.done, m.error};
        if (!st.tracker->OnReport(m.node_id, u)) {
          // Another attempt (lost earlier, or from before a restart): stop it.
          auto it = st.nodes.find(m.node_id);
          if (it != st.nodes.end()) self->send(it->second, StopJob{m.attempt, m.worker, "stale attempt"});
          return;
        }
        const JobRecord& r = st.tracker->record();
        if (!m.error.empty()) {
          spdlog::error("job: attempt {} failed on node {}: {}", m.attempt, m.node_id, m.error);
          std::printf("job: failed: %s\n", m.error.c_str());
        } else if (m.step % st.log_every == 0 || m.step == 1 || m.done || m.val_loss >= 0) {
          std::printf("step %5d/%d | loss %.4f | main %.4f | lr %.2e | gnorm %.3f | %.0f tok/s", m.step,
                      m.total_steps, m.loss, m.main_loss, m.lr, m.grad_norm, m.tokens_per_s);
          if (m.val_loss >= 0) std::printf(" | val_loss %.4f", m.val_loss);
          if (m.val_loss >= 0 && m.unigram_baseline >= 0) std::printf(" | unigram_baseline %.4f", m.unigram_baseline);
          std::printf(" | node %s\n", m.node_id.c_str());
        }
        if (r.state == JobState::kCompleted) std::printf("job: completed at step %d\n", r.step);
        std::fflush(stdout);
        // State changes are saved at once; plain progress at most once a second
        // (a synced write per step would fall behind fast steps).
        if (r.state != JobState::kRunning || std::chrono::steady_clock::now() - st.last_save >= std::chrono::seconds(1))
          Save(self);
      },
      [=](caf::get_atom) -> std::string { return JobJson(self->state.tracker->record()).dump(); },
      [=](stop_atom) -> caf::result<int, std::string> {
        auto& st = self->state;
        const JobRecord before = st.tracker->record();
        Status s = st.tracker->Stop();
        if (!s.ok()) return {409, json{{"error", s.message()}}.dump()};
        auto it = st.nodes.find(before.node_id);
        if (before.state == JobState::kRunning && it != st.nodes.end())
          self->send(it->second, StopJob{before.attempt, before.worker, "stopped through the API"});
        spdlog::info("job: stopped through the API at step {}", before.step);
        std::printf("job: stopped at step %d\n", before.step);
        std::fflush(stdout);
        Save(self);
        return {200, JobJson(st.tracker->record()).dump()};
      },
  };
}

}  // namespace troupe::cluster
