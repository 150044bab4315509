// The job actor: JobTracker + StateStore; assigns the job to a worker (or,
// for a distributed job, one worker per rank), collects step reports,
// reassigns when a node of the attempt is lost.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>

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

json Ranks(const JobRecord& r) {
  json out = json::array();
  for (size_t i = 0; i < r.ranks.size(); ++i)
    out.push_back({{"rank", i}, {"node_id", r.ranks[i].node_id}, {"worker", r.ranks[i].worker}});
  return out;
}

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
          {"ranks", Ranks(r)},
          {"dp", r.dp},
          {"checkpoint_id", r.checkpoint_id},
          {"history", hist}};
}

std::vector<std::string> LiveNodes(Self self) {
  std::vector<std::string> ids;
  for (const auto& [id, handle] : self->state.nodes) ids.push_back(id);
  return ids;
}

json CheckpointJson(const ckpt::Manifest& m) {
  std::set<std::string> nodes;
  for (const ckpt::TensorRecord& t : m.tensors)
    for (const ckpt::ShardRef& s : t.shards) nodes.insert(s.stores.begin(), s.stores.end());
  json metrics = json::object();
  for (const auto& [k, v] : m.metrics) metrics[k] = Num(v);
  return {{"id", m.id},
          {"step", m.step},
          {"phase", m.phase},
          {"created_unix_ms", m.created_unix_ms},
          {"replication", m.replication},
          {"bytes", m.TotalBytes()},
          {"tensors", m.tensors.size()},
          {"nodes", nodes},
          {"pinned", m.pinned},
          {"config_hash", m.config_hash},
          {"metrics", metrics}};
}

// Prints and carries out what a checkpoint event decided: a commit is
// announced, dropped checkpoints are deleted on every node that may hold them.
void Apply(Self self, const KeeperOutcome& out) {
  auto& st = self->state;
  if (out.committed) {
    const ckpt::Manifest& m = *out.committed;
    const json j = CheckpointJson(m);
    std::string nodes;
    for (const auto& n : j["nodes"]) nodes += (nodes.empty() ? "" : ",") + n.get<std::string>();
    spdlog::info("checkpoint {} at step {} committed (r={} on {})", m.id, m.step, m.replication, nodes);
    std::printf("checkpoint: %s at step %lld committed, %.1f MiB, r=%d on %s\n", m.id.c_str(),
                static_cast<long long>(m.step), m.TotalBytes() / 1048576.0, m.replication, nodes.c_str());
  }
  for (const std::string& f : out.failures) {
    spdlog::warn("{}", f);
    std::printf("checkpoint: %s\n", f.c_str());
  }
  std::fflush(stdout);
  for (const std::string& id : out.drop)
    for (const auto& [node, handle] : st.nodes) self->send(handle, DropCheckpoint{id});
}

JobAssign NewAssign(const JobRecord& r, int worker) {
  JobAssign a;
  a.attempt = r.attempt;
  a.worker = worker;
  a.config_name = r.config_name;
  a.toml_text = r.toml_text;
  return a;
}

// Tells every rank of an attempt still on a live node to stop.
void StopRanks(Self self, uint64_t attempt, const std::vector<WorkerSlot>& ranks, const std::string& why) {
  for (const WorkerSlot& w : ranks) {
    auto it = self->state.nodes.find(w.node_id);
    if (it != self->state.nodes.end()) self->send(it->second, StopJob{attempt, w.worker, why});
  }
}

// A distributed job: plans the ranks over the live nodes' workers and sends
// each its part, resuming from the newest checkpoint its rank 0 committed.
void TryAssignRanks(Self self, const JobConfig& cfg) {
  auto& st = self->state;
  auto plan = PlanRanks(cfg, st.workers);
  if (!plan.ok()) {
    if (plan.status().IsInvalidArgument()) {
      st.tracker->Fail("the layout cannot run: " + plan.status().message());
      std::printf("job: failed: %s\n", st.tracker->record().message.c_str());
      std::fflush(stdout);
      Save(self);
    } else if (plan.status().message() != st.waiting) {
      st.waiting = plan.status().message();
      std::printf("job: waiting for workers: %s\n", st.waiting.c_str());
      std::fflush(stdout);
    }
    return;
  }
  st.waiting.clear();
  st.grow_to_dp = 0;
  const JobRecord& before = st.tracker->record();
  const std::string resume = before.checkpoint_id;
  const int resume_step = resume.empty() ? 0 : before.checkpoint_step;
  if (!st.tracker->AssignRanks(plan->ranks, plan->dp, resume_step)) return;
  const JobRecord& r = st.tracker->record();
  st.rendezvous.Reset(r.attempt, r.ranks);
  spdlog::info("job: attempt {} of '{}' on {} ranks:\n{}", r.attempt, r.config_name, r.ranks.size(), plan->explanation);
  std::printf("job: attempt %llu on %zu ranks (dp %d)", static_cast<unsigned long long>(r.attempt), r.ranks.size(),
              r.dp);
  if (!resume.empty()) std::printf(", resuming from %s (step %d)", resume.c_str(), resume_step);
  std::printf("\n%s", plan->explanation.c_str());
  if (st.shared_dir.empty() && cfg.checkpoint.every > 0)
    std::printf(
        "job: no --shared-dir: a distributed job keeps no checkpoints, and a lost node restarts it from step 0\n");
  std::fflush(stdout);
  for (size_t rank = 0; rank < r.ranks.size(); ++rank) {
    JobAssign a = NewAssign(r, r.ranks[rank].worker);
    a.rank = static_cast<int32_t>(rank);
    a.world = static_cast<int32_t>(r.ranks.size());
    a.dp = r.dp;
    if (!st.shared_dir.empty()) a.checkpoint_dir = st.shared_dir + "/checkpoints";
    a.resume_id = resume;
    a.ranked = true;
    self->send(st.nodes[r.ranks[rank].node_id], a);
  }
  Save(self);
}

// The replicas a running distributed job with parallel.dp = 0 and
// checkpoints could grow to on the live workers; 0 when it cannot grow.
int ReplicasToGrowTo(Self self) {
  auto& st = self->state;
  const JobRecord& r = st.tracker->record();
  if (r.state != JobState::kRunning || st.shared_dir.empty() || !st.config) return 0;
  const JobConfig& cfg = *st.config;
  if (!IsDistributed(cfg.parallel) || cfg.parallel.dp != 0 || cfg.checkpoint.every <= 0) return 0;
  auto plan = PlanRanks(cfg, st.workers);
  return plan.ok() && plan->dp > r.dp ? plan->dp : 0;
}

// Workers joined: if they allow more replicas, the job grows at its next
// committed checkpoint (growing sooner would throw away the steps since the
// last one).
void ConsiderGrowing(Self self) {
  auto& st = self->state;
  const int dp = ReplicasToGrowTo(self);
  if (dp == 0 || dp == st.grow_to_dp) return;
  st.grow_to_dp = dp;
  std::printf("job: the live workers now allow %d replicas (running %d); the job grows at its next checkpoint\n", dp,
              st.tracker->record().dp);
  std::fflush(stdout);
}

// Gives the job to the first free worker of a live node, if it needs one,
// resuming from the newest committed checkpoint of its config.
void TryAssign(Self self) {
  auto& st = self->state;
  if (!st.tracker->NeedsWorker()) return;
  if (st.config && IsDistributed(st.config->parallel)) return TryAssignRanks(self, *st.config);
  std::vector<WorkerSlot> slots;
  for (const auto& [id, n] : st.workers)
    if (n > 0 && st.nodes.count(id)) slots.push_back({id, 0});
  if (slots.empty()) return;
  std::optional<ckpt::Manifest> resume;
  if (st.checkpoints) {
    auto latest = st.checkpoints->LatestFor(ckpt::ConfigHash(st.tracker->record().toml_text));
    if (latest.ok()) {
      resume = std::move(latest).value();
    } else {
      spdlog::error("job: cannot read the checkpoint catalog, starting from step 0: {}", latest.status().message());
    }
  }
  auto slot = st.tracker->Assign(slots, resume ? static_cast<int>(resume->step) : 0);
  if (!slot) return;
  const JobRecord& r = st.tracker->record();
  spdlog::info("job: attempt {} of '{}' assigned to node {} worker {}{}", r.attempt, r.config_name, slot->node_id,
               slot->worker, resume ? " resuming from " + resume->id : "");
  std::printf("job: attempt %llu on node %s worker %d", static_cast<unsigned long long>(r.attempt),
              slot->node_id.c_str(), slot->worker);
  if (resume) std::printf(", resuming from %s (step %lld)", resume->id.c_str(), static_cast<long long>(resume->step));
  std::printf("\n");
  std::fflush(stdout);
  JobAssign a = NewAssign(r, slot->worker);
  if (resume) {
    a.resume_manifest = ckpt::EncodeManifest(*resume);
    a.live_nodes = LiveNodes(self);
  }
  self->send(st.nodes[slot->node_id], a);
  Save(self);
}

constexpr std::chrono::seconds kCheckpointTick{1};

}  // namespace

job_actor::behavior_type JobActor(Self self, JobRecord record, std::shared_ptr<StateStore> store,
                                  std::shared_ptr<CheckpointKeeper> checkpoints, std::string shared_dir) {
  self->state.checkpoints = std::move(checkpoints);
  self->state.shared_dir = std::move(shared_dir);
  self->delayed_send(self, kCheckpointTick, caf::tick_atom_v);
  if (auto cfg = ParseConfigText(record.toml_text, record.config_path); cfg.ok()) {
    self->state.log_every = std::max(1, cfg->train.log_every);
    self->state.config = std::move(cfg).value();
  }
  self->state.tracker = std::make_unique<JobTracker>(std::move(record));
  // A coordinator that restarts while a distributed attempt runs takes up
  // its rendezvous where it is (ranks repeat their entries until answered).
  if (const JobRecord& r = self->state.tracker->record(); r.state == JobState::kRunning && !r.ranks.empty())
    self->state.rendezvous.Reset(r.attempt, r.ranks);
  self->state.store = std::move(store);
  Save(self);
  return {
      [=](node_up_atom, const std::string& id, node_actor handle, int32_t workers) {
        self->state.nodes[id] = handle;
        self->state.workers[id] = workers;
        TryAssign(self);
        ConsiderGrowing(self);
      },
      [=](node_down_atom, const std::string& id, const std::string& why) {
        auto& st = self->state;
        const JobRecord& r = st.tracker->record();
        const uint64_t attempt = r.attempt;
        const std::vector<WorkerSlot> ranks = r.ranks;
        if (st.tracker->OnNodeLost(id, why)) {
          spdlog::warn("job: {}", st.tracker->record().message);
          std::printf("job: interrupted: %s\n", st.tracker->record().message.c_str());
          std::fflush(stdout);
          // Every rank of the lost attempt still alive stops (a draining node
          // is alive too): the next attempt replans them all.
          StopRanks(self, attempt, ranks, "attempt lost: node " + id + " " + why);
          Save(self);
        }
        st.nodes.erase(id);
        st.workers.erase(id);
        if (st.checkpoints) Apply(self, st.checkpoints->OnNodeLost(id));
        TryAssign(self);
      },
      [=](const CheckpointBegin& b) {
        auto& st = self->state;
        auto it = st.nodes.find(b.node_id);
        if (it == st.nodes.end()) return;  // not a node that may keep data now
        CheckpointPlan plan;
        plan.attempt = b.attempt;
        plan.step = b.step;
        const JobRecord& r = st.tracker->record();
        if (!st.checkpoints) {
          plan.reason = "the coordinator has no checkpoint catalog (see its log)";
        } else if (r.state != JobState::kRunning || r.attempt != b.attempt || r.node_id != b.node_id) {
          plan.reason = "attempt " + std::to_string(b.attempt) + " is not the job's running attempt";
        } else {
          auto p = st.checkpoints->Begin(b.node_id, b.attempt, b.step, LiveNodes(self), CheckpointKeeper::Clock::now());
          if (p.ok()) {
            plan.id = p->id;
            plan.replicas = p->replicas;
            if (st.config) plan.shards_per_tensor = st.config->checkpoint.shards_per_tensor;
          } else {
            plan.reason = p.status().message();
          }
        }
        if (!plan.reason.empty()) spdlog::warn("checkpoint at step {} refused: {}", b.step, plan.reason);
        self->send(it->second, plan);
      },
      [=](const CheckpointWritten& w) {
        if (self->state.checkpoints)
          Apply(self, self->state.checkpoints->OnWritten(w.node_id, w.id, w.manifest, w.error));
      },
      [=](const ShardsDurable& d) {
        if (self->state.checkpoints) Apply(self, self->state.checkpoints->OnDurable(d.node_id, d.id, d.error));
      },
      [=](const RankAddress& a) {
        auto& st = self->state;
        auto tables = st.rendezvous.Add(a);
        if (!tables.ok()) {
          spdlog::debug("job: rendezvous entry refused: {}", tables.status().message());
          // A rank of an attempt that is over waits for a table that will not
          // come: tell its worker to stop it (its StopJob may have been lost).
          const JobRecord& r = st.tracker->record();
          auto it = st.nodes.find(a.node_id);
          if ((a.attempt != r.attempt || r.state != JobState::kRunning) && it != st.nodes.end())
            self->send(it->second, StopJob{a.attempt, a.worker, "stale attempt"});
          return;
        }
        for (auto& [slot, table] : *tables) {
          auto it = st.nodes.find(slot.node_id);
          if (it != st.nodes.end()) self->send(it->second, table);
        }
      },
      [=](caf::tick_atom) {
        if (self->state.checkpoints) Apply(self, self->state.checkpoints->Expire(CheckpointKeeper::Clock::now()));
        self->delayed_send(self, kCheckpointTick, caf::tick_atom_v);
      },
      [=](ckpt_atom) -> caf::result<int, std::string> {
        if (!self->state.checkpoints) return {503, json{{"error", "the coordinator has no checkpoint catalog"}}.dump()};
        auto all = self->state.checkpoints->catalog().List();
        if (!all.ok()) return {500, json{{"error", all.status().message()}}.dump()};
        json list = json::array();
        for (const ckpt::Manifest& m : *all) list.push_back(CheckpointJson(m));
        return {200, json{{"checkpoints", list}, {"saving", self->state.checkpoints->pending()}}.dump()};
      },
      [=](StepReport& m) {
        auto& st = self->state;
        StepUpdate u{m.attempt, m.step,      m.total_steps,   m.loss,           m.main_loss,
                     m.lr,      m.grad_norm, m.tokens_per_s,  m.val_loss,       m.done,
                     m.error,   m.rank,      m.checkpoint_id, m.checkpoint_step};
        if (!st.tracker->OnReport(m.node_id, u)) {
          // Another attempt (lost earlier, or from before a restart): stop it.
          auto it = st.nodes.find(m.node_id);
          if (it != st.nodes.end()) self->send(it->second, StopJob{m.attempt, m.worker, "stale attempt"});
          return;
        }
        const JobRecord& r = st.tracker->record();
        if (!m.error.empty()) {
          spdlog::error("job: attempt {} failed on node {}: {}", m.attempt, m.node_id, r.message);
          std::printf("job: failed: %s\n", r.message.c_str());
          StopRanks(self, m.attempt, r.ranks, "rank " + std::to_string(m.rank) + " failed");
        } else if (m.rank != 0) {
          return;
        } else if (m.step % st.log_every == 0 || m.step == 1 || m.done || m.val_loss >= 0) {
          std::printf("step %5d/%d | loss %.4f | main %.4f | lr %.2e | gnorm %.3f | %.0f tok/s", m.step, m.total_steps,
                      m.loss, m.main_loss, m.lr, m.grad_norm, m.tokens_per_s);
          if (m.val_loss >= 0) std::printf(" | val_loss %.4f", m.val_loss);
          if (m.val_loss >= 0 && m.unigram_baseline >= 0) std::printf(" | unigram_baseline %.4f", m.unigram_baseline);
          std::printf(" | node %s\n", m.node_id.c_str());
        }
        if (!m.checkpoint_id.empty())
          std::printf("checkpoint: %s at step %d committed by the job's ranks\n", m.checkpoint_id.c_str(),
                      m.checkpoint_step);
        if (r.state == JobState::kCompleted) std::printf("job: completed at step %d\n", r.step);
        std::fflush(stdout);
        if (!m.checkpoint_id.empty() && st.grow_to_dp > 0 && r.state == JobState::kRunning) {
          // The workers may have left again since: grow only if they still allow more replicas.
          st.grow_to_dp = ReplicasToGrowTo(self);
          if (st.grow_to_dp == 0) return;
          const uint64_t attempt = r.attempt;
          const std::vector<WorkerSlot> ranks = r.ranks;
          const std::string why =
              "growing to " + std::to_string(st.grow_to_dp) + " replicas from checkpoint " + m.checkpoint_id;
          std::printf("job: %s\n", why.c_str());
          st.tracker->Requeue(why);
          StopRanks(self, attempt, ranks, why);
          Save(self);
          TryAssign(self);
          return;
        }
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
        if (before.state == JobState::kRunning)
          StopRanks(self, before.attempt, before.ranks, "stopped through the API");
        spdlog::info("job: stopped through the API at step {}", before.step);
        std::printf("job: stopped at step %d\n", before.step);
        std::fflush(stdout);
        Save(self);
        return {200, JobJson(st.tracker->record()).dump()};
      },
  };
}

}  // namespace troupe::cluster
