// The membership actor: Membership + StateStore behind a typed protocol.
// Every membership change is written (synced) before the next message.
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include "actors/transport/codec.h"
#include "coordinator/actors.h"

namespace troupe::cluster {
namespace {

using namespace protocol;
using json = nlohmann::json;
using Self = membership_actor::stateful_pointer<MembershipActorState>;

constexpr std::chrono::milliseconds kTick{100};  // failure-detection period

NodeSpec ToSpec(const Join& j, const PeerRef& p) {
  NodeSpec s;
  s.name = j.name;
  s.host = j.host;
  for (const DeviceDesc& d : j.devices) s.devices.push_back({d.kind, d.name, d.memory_bytes});
  s.memory_bytes = j.memory_bytes;
  s.capacity = j.capacity;
  s.incarnation = j.incarnation;
  s.public_key = p.public_key;
  return s;
}

// A frame to a peer that has no proxy (refusals, unknown senders).
template <class T>
void SendDirect(Self self, const std::string& routing_id, const T& msg) {
  caf::anon_send(self->state.bridge, send_atom_v, routing_id, static_cast<uint16_t>(T::kType),
                 transport::Serialize(msg));
}

void Persist(Self self) {
  auto& st = self->state;
  if (st.membership->epoch() == st.saved_epoch) return;
  Status s = st.store->SaveMembership(st.membership->Snapshot());
  if (!s.ok()) {
    spdlog::error("membership: could not persist epoch {}: {}", st.membership->epoch(), s.message());
    return;
  }
  st.saved_epoch = st.membership->epoch();
}

// The proxy for `id`, created on first contact, told about a new routing id.
node_proxy_actor ProxyFor(Self self, const std::string& id, const std::string& routing_id) {
  auto& st = self->state;
  auto it = st.proxies.find(id);
  if (it == st.proxies.end()) {
    auto p = self->spawn(NodeProxy, st.bridge, routing_id);
    st.routing[id] = routing_id;
    return st.proxies[id] = p;
  }
  if (st.routing[id] != routing_id) {
    st.routing[id] = routing_id;
    self->send(it->second, peer_atom_v, routing_id);
  }
  return it->second;
}

// The node `id` exists and authenticated with its own key.
const NodeRecord* Sender(Self self, const std::string& id, const PeerRef& p) {
  const NodeRecord* n = self->state.membership->Find(id);
  if (!n || n->spec.public_key != p.public_key) return nullptr;
  return n;
}

json NodeJson(const NodeRecord& n, Clock::time_point now) {
  json devs = json::array();
  for (const Device& d : n.spec.devices)
    devs.push_back({{"kind", d.kind}, {"name", d.name}, {"memory_bytes", d.memory_bytes}});
  const double age = std::chrono::duration<double>(now - n.last_heartbeat).count();
  return {{"id", n.id},
          {"name", n.spec.name},
          {"host", n.spec.host},
          {"state", NodeStateName(n.state)},
          {"devices", devs},
          {"memory_bytes", n.spec.memory_bytes},
          {"capacity", n.spec.capacity},
          {"last_heartbeat_age_s", age},
          {"joined_epoch", n.joined_epoch}};
}

// A checkpoint message from a node goes to the job actor if its key is the
// node's own.
template <class T>
void ToJob(Self self, T& msg, const PeerRef& p) {
  if (!Sender(self, msg.node_id, p)) {
    self->state.counters->bad_messages++;
    return;
  }
  self->send(self->state.job, std::move(msg));
}

// Node-to-node messages pass through here: the sender must be `from_node`
// (by key) and `to_node` a node this coordinator knows.
template <class T>
void Relay(Self self, T& msg, const PeerRef& p) {
  auto& st = self->state;
  auto to = st.proxies.find(msg.to_node);
  if (!Sender(self, msg.from_node, p) || to == st.proxies.end() || msg.to_node == msg.from_node) {
    st.counters->bad_messages++;
    return;
  }
  self->send(to->second, std::move(msg));
}

}  // namespace

membership_actor::behavior_type MembershipActor(Self self, Membership membership, std::shared_ptr<StateStore> store,
                                                job_actor job, std::shared_ptr<transport::SecureServer> server,
                                                std::shared_ptr<CoordinatorCounters> counters) {
  auto& st = self->state;
  st.membership = std::make_unique<Membership>(std::move(membership));
  st.store = std::move(store);
  st.job = job;
  st.counters = counters;
  st.started = st.membership->Now();
  st.bridge = self->spawn<caf::detached>(ServerBridge, server, membership_actor(self), counters);
  Persist(self);
  self->delayed_send(self, kTick, caf::tick_atom_v);
  return {
      [=](Join& j, PeerRef& p) {
        auto& st = self->state;
        auto r = st.membership->Join(ToSpec(j, p));
        if (!r.ok()) {
          spdlog::warn("membership: refused join of '{}' (key {}): {}", j.name, p.public_key.substr(0, 8),
                       r.status().message());
          SendDirect(self, p.routing_id, JoinRefused{r.status().message()});
          return;
        }
        auto proxy = ProxyFor(self, r->node_id, p.routing_id);
        if (r->new_incarnation) self->send(st.job, node_down_atom_v, r->node_id, std::string("restarted"));
        const auto& opt = st.membership->options();
        self->send(proxy, JoinAck{r->node_id, r->epoch, static_cast<uint32_t>(opt.heartbeat_interval.count()),
                                  static_cast<uint32_t>(opt.failure_timeout.count())});
        self->send(st.job, node_up_atom_v, r->node_id, node_actor(proxy), static_cast<int32_t>(j.capacity));
        spdlog::info("membership: node {} ('{}' on {}, {} workers) {}; epoch {}", r->node_id, j.name, j.host,
                     j.capacity, r->rejoined ? "rejoined" : "joined", r->epoch);
        Persist(self);
      },
      [=](Heartbeat& h, PeerRef& p) {
        auto& st = self->state;
        const NodeRecord* n = Sender(self, h.node_id, p);
        const NodeState before = n ? n->state : NodeState::kDead;
        Status s =
            n ? st.membership->Heartbeat(h.node_id, h.incarnation) : Status::NotFound("unknown node or wrong key");
        if (!s.ok()) {
          SendDirect(self, p.routing_id, HeartbeatAck{st.membership->epoch(), h.sequence, false});
          return;
        }
        auto proxy = ProxyFor(self, h.node_id, p.routing_id);
        if (before == NodeState::kUnconfirmed) {
          spdlog::info("membership: node {} confirmed after the restart; epoch {}", h.node_id, st.membership->epoch());
          self->send(st.job, node_up_atom_v, h.node_id, node_actor(proxy), static_cast<int32_t>(n->spec.capacity));
        }
        self->send(proxy, HeartbeatAck{st.membership->epoch(), h.sequence, true});
        Persist(self);
      },
      [=](Leave& l, PeerRef& p) {
        auto& st = self->state;
        if (!Sender(self, l.node_id, p) || st.membership->Find(l.node_id)->spec.incarnation != l.incarnation) return;
        if (!st.membership->Leave(l.node_id).ok()) return;
        spdlog::info("membership: node {} left ({}); epoch {}", l.node_id, l.reason, st.membership->epoch());
        self->send(st.job, node_down_atom_v, l.node_id, std::string("left: ") + l.reason);
        Persist(self);
      },
      [=](StepReport& r, PeerRef& p) {
        if (!Sender(self, r.node_id, p)) {
          self->state.counters->bad_messages++;
          return;
        }
        self->send(self->state.job, std::move(r));
      },
      [=](CheckpointBegin& m, PeerRef& p) { ToJob(self, m, p); },
      [=](CheckpointWritten& m, PeerRef& p) { ToJob(self, m, p); },
      [=](ShardsDurable& m, PeerRef& p) { ToJob(self, m, p); },
      [=](RankAddress& m, PeerRef& p) { ToJob(self, m, p); },
      [=](ShardCopy& m, PeerRef& p) { Relay(self, m, p); },
      [=](ShardCopyEnd& m, PeerRef& p) { Relay(self, m, p); },
      [=](ShardFetch& m, PeerRef& p) { Relay(self, m, p); },
      [=](caf::tick_atom) {
        auto& st = self->state;
        for (const std::string& id : st.membership->DetectFailures()) {
          spdlog::warn("membership: node {} declared dead after {} ms without a heartbeat; epoch {}", id,
                       st.membership->options().failure_timeout.count(), st.membership->epoch());
          self->send(st.job, node_down_atom_v, id, std::string("dead (missed heartbeats)"));
        }
        Persist(self);
        self->delayed_send(self, kTick, caf::tick_atom_v);
      },
      [=](caf::get_atom) -> std::string {
        auto& m = *self->state.membership;
        const auto now = m.Now();
        json nodes = json::array();
        for (const NodeRecord& n : m.Nodes()) nodes.push_back(NodeJson(n, now));
        json counts = json::object();
        for (NodeState s :
             {NodeState::kAlive, NodeState::kUnconfirmed, NodeState::kDraining, NodeState::kDead, NodeState::kLeft})
          counts[NodeStateName(s)] = m.CountInState(s);
        return json{{"epoch", m.epoch()},
                    {"uptime_s", std::chrono::duration<double>(now - self->state.started).count()},
                    {"heartbeat_interval_ms", m.options().heartbeat_interval.count()},
                    {"failure_timeout_ms", m.options().failure_timeout.count()},
                    {"counts", counts},
                    {"nodes", nodes}}
            .dump();
      },
      [=](drain_atom, const std::string& id) -> caf::result<int, std::string> {
        auto& st = self->state;
        Status s = st.membership->Drain(id);
        if (!s.ok()) return {s.IsNotFound() ? 404 : 409, json{{"error", s.message()}}.dump()};
        spdlog::info("membership: node {} draining; epoch {}", id, st.membership->epoch());
        self->send(st.job, node_down_atom_v, id, std::string("draining"));
        auto it = st.proxies.find(id);
        if (it != st.proxies.end()) self->send(it->second, Drain{"drained through the API"});
        Persist(self);
        return {200, json{{"node", id}, {"state", "draining"}, {"epoch", st.membership->epoch()}}.dump()};
      },
      [=](stop_atom) {
        caf::anon_send(self->state.bridge, stop_atom_v);
        Persist(self);
        self->quit();
      },
  };
}

}  // namespace troupe::cluster
