// The node agent: joins, heartbeats, reconnects, routes work to workers.
//
//   ┌─────────┐  JoinAck   ┌─────────┐  Drain / stop   ┌─────────┐
//   │ joining │──────────▶ │ running │───────────────▶ │ leaving │ (quit)
//   └─────────┘            └─────────┘                 └─────────┘
//     ▲  │ Join every backoff   │ coordinator silent for the failure
//     │  │ (0.25 s .. 4 s);     │ timeout, or HeartbeatAck{known=false}
//     │  │ JoinRefused: quit    │
//     └──┴──────────────────────┘ (reconnect the socket, join again)
//
// One 100 ms timer drives both states. Workers keep training while the
// agent reconnects: their reports flow again once the coordinator is back.
#include <spdlog/spdlog.h>

#include <random>

#include "actors/node/node_actors.h"

namespace troupe::node {
namespace {

using namespace protocol;
using Self = agent_actor::stateful_pointer<AgentState>;
using SteadyClock = std::chrono::steady_clock;

constexpr std::chrono::milliseconds kTick{100};
// Joins are small: retry at least every 2 s so a restarted coordinator sees
// the node again within seconds.
constexpr std::chrono::milliseconds kMaxBackoff{2000};

agent_actor::behavior_type Joining(Self self);
agent_actor::behavior_type Running(Self self);

void SendJoin(Self self) {
  auto& st = self->state;
  Join j;
  j.name = st.config.name;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  j.host = host;
  for (const WorkerDevice& d : st.config.devices) j.devices.push_back({d.kind, d.name, d.memory_bytes});
  j.memory_bytes = st.config.memory_bytes;
  j.capacity = static_cast<int32_t>(st.config.devices.size());
  j.incarnation = st.incarnation;
  self->send(st.coordinator, j);
}

// Leaves: workers stop, Leave is sent, the bridge is stopped after a short
// flush delay, then the agent quits.
void LeaveAndQuit(Self self, const std::string& reason, int exit_code) {
  auto& st = self->state;
  if (st.leaving) return;
  st.leaving = true;
  for (auto& w : st.workers) self->send(w, stop_atom_v);
  if (!st.node_id.empty()) self->send(st.coordinator, Leave{st.node_id, st.incarnation, reason});
  spdlog::info("agent: leaving ({})", reason);
  caf::delayed_anon_send(st.bridge, std::chrono::milliseconds(300), stop_atom_v);
  st.outcome->Set(exit_code, reason);
  self->quit();
}

void Reconnect(Self self, const std::string& why) {
  auto& st = self->state;
  spdlog::warn("agent: {}; reconnecting and joining again", why);
  caf::anon_send(st.bridge, reconnect_atom_v);
  st.backoff = std::chrono::milliseconds(250);
  st.next_join = SteadyClock::now();
  self->become(Joining(self));
}

// Handlers both states share.
void ToWorker(Self self, int32_t worker, const auto& msg) {
  auto& st = self->state;
  if (worker < 0 || worker >= static_cast<int32_t>(st.workers.size())) {
    spdlog::warn("agent: message for worker {} but this node has {}", worker, st.workers.size());
    return;
  }
  self->send(st.workers[worker], msg);
}

template <class T>
void ToStorage(Self self, T&& msg) {
  if (self->state.storage) self->send(self->state.storage, std::forward<T>(msg));
}

// A worker's message for the coordinator, signed with this node's id.
template <class T>
void Report(Self self, T& r) {
  r.node_id = self->state.node_id;
  if (!r.node_id.empty()) self->send(self->state.coordinator, std::move(r));
}

agent_actor::behavior_type Joining(Self self) {
  return {
      [=](const JoinAck& a) {
        auto& st = self->state;
        st.node_id = a.node_id;
        st.heartbeat = std::chrono::milliseconds(std::max<uint32_t>(50, a.heartbeat_ms));
        st.timeout = std::chrono::milliseconds(std::max<uint32_t>(200, a.failure_timeout_ms));
        st.last_contact = SteadyClock::now();
        st.last_heartbeat = SteadyClock::time_point{};
        spdlog::info("agent: joined as {} (epoch {})", a.node_id, a.epoch);
        if (st.storage) self->send(st.storage, joined_atom_v, a.node_id);
        std::printf("node %s: joined as %s, epoch %llu\n", st.config.name.c_str(), a.node_id.c_str(),
                    static_cast<unsigned long long>(a.epoch));
        std::fflush(stdout);
        self->become(Running(self));
      },
      [=](const JoinRefused& r) {
        spdlog::error("agent: join refused: {}", r.reason);
        LeaveAndQuit(self, "join refused: " + r.reason, 1);
      },
      [=](const HeartbeatAck&) {},
      [=](const Drain&) { LeaveAndQuit(self, "drained", 0); },
      [=](const JobAssign& j) { ToWorker(self, j.worker, j); },
      [=](const StopJob& s) { ToWorker(self, s.worker, s); },
      [=](const CheckpointPlan& m) { ToStorage(self, m); },
      [=](ShardCopy& m) { ToStorage(self, std::move(m)); },
      [=](const ShardCopyEnd& m) { ToStorage(self, m); },
      [=](const ShardFetch& m) { ToStorage(self, m); },
      [=](const DropCheckpoint& m) { ToStorage(self, m); },
      [=](const RankTable& t) { ToWorker(self, t.worker, t); },
      [=](caf::tick_atom) {
        auto& st = self->state;
        if (st.leaving) return;
        const auto now = SteadyClock::now();
        if (now >= st.next_join) {
          SendJoin(self);
          st.next_join = now + st.backoff;
          st.backoff = std::min(st.backoff * 2, kMaxBackoff);
          // (A socket whose handshake never completes is rebuilt by the
          // bridge, which knows; rebuilding here would drop this join.)
        }
        self->delayed_send(self, kTick, caf::tick_atom_v);
      },
      [=](StepReport& r) { Report(self, r); },
      [=](RankAddress& a) { Report(self, a); },
      [=](stop_atom) { LeaveAndQuit(self, "shutdown", 0); },
  };
}

agent_actor::behavior_type Running(Self self) {
  return {
      [=](const JoinAck& a) { self->state.last_contact = SteadyClock::now(); },
      [=](const JoinRefused& r) {
        spdlog::error("agent: refused: {}", r.reason);
        LeaveAndQuit(self, "join refused: " + r.reason, 1);
      },
      [=](const HeartbeatAck& a) {
        auto& st = self->state;
        st.last_contact = SteadyClock::now();
        if (!a.known) Reconnect(self, "the coordinator does not know this node (restarted or declared it dead)");
      },
      [=](const Drain& d) { LeaveAndQuit(self, "drained: " + d.reason, 0); },
      [=](const JobAssign& j) {
        spdlog::info("agent: attempt {} of '{}' for worker {}", j.attempt, j.config_name, j.worker);
        ToWorker(self, j.worker, j);
      },
      [=](const StopJob& s) { ToWorker(self, s.worker, s); },
      [=](const CheckpointPlan& m) { ToStorage(self, m); },
      [=](ShardCopy& m) { ToStorage(self, std::move(m)); },
      [=](const ShardCopyEnd& m) { ToStorage(self, m); },
      [=](const ShardFetch& m) { ToStorage(self, m); },
      [=](const DropCheckpoint& m) { ToStorage(self, m); },
      [=](const RankTable& t) { ToWorker(self, t.worker, t); },
      [=](caf::tick_atom) {
        auto& st = self->state;
        if (st.leaving) return;
        const auto now = SteadyClock::now();
        if (now - st.last_contact > st.timeout) {
          Reconnect(self, "the coordinator has been silent for " + std::to_string(st.timeout.count()) + " ms");
        } else if (now - st.last_heartbeat >= st.heartbeat) {
          st.last_heartbeat = now;
          self->send(st.coordinator, Heartbeat{st.node_id, st.incarnation, ++st.sequence});
        }
        self->delayed_send(self, kTick, caf::tick_atom_v);
      },
      [=](StepReport& r) { Report(self, r); },
      [=](RankAddress& a) { Report(self, a); },
      [=](stop_atom) { LeaveAndQuit(self, "shutdown", 0); },
  };
}

}  // namespace

agent_actor::behavior_type Agent(Self self, AgentConfig config, std::shared_ptr<NodeOutcome> outcome) {
  auto& st = self->state;
  st.config = std::move(config);
  st.outcome = std::move(outcome);
  std::random_device rd;
  st.incarnation = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid());
  st.bridge = self->spawn<caf::detached>(ClientBridge, st.config.endpoint, st.config.server_public_key, st.config.keys,
                                         agent_actor(self));
  st.coordinator = self->spawn(CoordinatorProxy, st.bridge);
  if (!st.config.data_dir.empty()) st.storage = SpawnStorage(self, st.config.data_dir, st.coordinator);
  for (size_t i = 0; i < st.config.devices.size(); ++i)
    st.workers.push_back(self->spawn<caf::linked>(Worker, static_cast<int>(i), st.config.devices[i], agent_actor(self),
                                                  st.storage, st.config.cpu_threads, st.config.rank_host));
  st.next_join = SteadyClock::now();
  self->delayed_send(self, std::chrono::milliseconds(0), caf::tick_atom_v);
  return Joining(self);
}

}  // namespace troupe::node
