#include "coordinator/membership.h"

#include <charconv>

namespace troupe::cluster {
namespace {

// "n17" -> 17; nullopt for anything else.
std::optional<uint64_t> IdNumber(const std::string& id) {
  if (id.size() < 2 || id[0] != 'n') return std::nullopt;
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(id.data() + 1, id.data() + id.size(), v);
  if (ec != std::errc() || p != id.data() + id.size()) return std::nullopt;
  return v;
}

bool IsLive(NodeState s) { return s == NodeState::kAlive || s == NodeState::kUnconfirmed || s == NodeState::kDraining; }

}  // namespace

const char* NodeStateName(NodeState s) {
  switch (s) {
    case NodeState::kAlive:
      return "alive";
    case NodeState::kUnconfirmed:
      return "unconfirmed";
    case NodeState::kDraining:
      return "draining";
    case NodeState::kDead:
      return "dead";
    case NodeState::kLeft:
      return "left";
  }
  return "unknown";
}

Expected<NodeState> ParseNodeState(std::string_view name) {
  for (NodeState s :
       {NodeState::kAlive, NodeState::kUnconfirmed, NodeState::kDraining, NodeState::kDead, NodeState::kLeft})
    if (name == NodeStateName(s)) return s;
  return Status::Corruption("unknown node state '" + std::string(name) + "'");
}

Membership::Membership(MembershipOptions options, ClockFn now) : options_(options), now_(std::move(now)) {
  if (!now_) now_ = [] { return Clock::now(); };
}

Membership Membership::Restore(const MembershipSnapshot& snap, MembershipOptions options, ClockFn now) {
  Membership m(options, std::move(now));
  m.epoch_ = snap.epoch;
  m.next_id_ = snap.next_id;
  const auto t = m.now_();
  for (const NodeRecord& r : snap.nodes) {
    auto num = IdNumber(r.id);
    if (!num) continue;  // the store validated ids; skip rather than crash
    NodeRecord n = r;
    if (IsLive(n.state)) n.state = NodeState::kUnconfirmed;
    n.last_heartbeat = t;
    m.nodes_[*num] = std::move(n);
    if (*num >= m.next_id_) m.next_id_ = *num + 1;
  }
  ++m.epoch_;
  return m;
}

NodeRecord* Membership::FindMutable(const std::string& id) {
  auto num = IdNumber(id);
  if (!num) return nullptr;
  auto it = nodes_.find(*num);
  return it == nodes_.end() ? nullptr : &it->second;
}

const NodeRecord* Membership::Find(const std::string& id) const {
  return const_cast<Membership*>(this)->FindMutable(id);
}

void Membership::SetState(NodeRecord& n, NodeState s) {
  if (n.state == s) return;
  n.state = s;
  ++epoch_;
}

Expected<JoinResult> Membership::Join(const NodeSpec& spec) {
  if (spec.name.empty()) return Status::InvalidArgument("join: empty node name");
  if (spec.capacity < 0 || spec.capacity > kMaxCapacity)
    return Status::InvalidArgument("join: capacity " + std::to_string(spec.capacity) + " is not 0.." +
                                   std::to_string(kMaxCapacity) + " workers");
  JoinResult res;
  NodeRecord* known = nullptr;
  for (auto& [num, n] : nodes_)
    if (n.spec.name == spec.name) known = &n;
  if (known && known->spec.public_key != spec.public_key)
    return Status::InvalidArgument("join: node name '" + spec.name + "' belongs to another key");
  if (known) {
    res.rejoined = true;
    res.new_incarnation = known->spec.incarnation != spec.incarnation;
    known->spec = spec;
    known->state = NodeState::kAlive;
    known->last_heartbeat = now_();
    known->joined_epoch = ++epoch_;  // a rejoin is always a change
    res.node_id = known->id;
  } else {
    NodeRecord n;
    const uint64_t num = next_id_++;
    n.id = "n" + std::to_string(num);
    n.spec = spec;
    n.state = NodeState::kAlive;
    n.last_heartbeat = now_();
    n.joined_epoch = ++epoch_;
    res.node_id = n.id;
    nodes_[num] = std::move(n);
  }
  res.epoch = epoch_;
  return res;
}

Status Membership::Heartbeat(const std::string& id, uint64_t incarnation) {
  NodeRecord* n = FindMutable(id);
  if (!n) return Status::NotFound("heartbeat from unknown node '" + id + "'");
  if (!IsLive(n->state))
    return Status::NotFound("heartbeat from node " + id + " which is " + NodeStateName(n->state) + ": join again");
  if (n->spec.incarnation != incarnation)
    return Status::NotFound("heartbeat from another process of node " + id + ": join again");
  n->last_heartbeat = now_();
  if (n->state == NodeState::kUnconfirmed) SetState(*n, NodeState::kAlive);
  return Status::Ok();
}

Status Membership::Leave(const std::string& id) {
  NodeRecord* n = FindMutable(id);
  if (!n) return Status::NotFound("leave from unknown node '" + id + "'");
  SetState(*n, NodeState::kLeft);
  return Status::Ok();
}

Status Membership::Drain(const std::string& id) {
  NodeRecord* n = FindMutable(id);
  if (!n) return Status::NotFound("no node '" + id + "'");
  if (!IsLive(n->state))
    return Status::InvalidArgument("node " + id + " is " + NodeStateName(n->state) + " and cannot be drained");
  SetState(*n, NodeState::kDraining);
  return Status::Ok();
}

std::vector<std::string> Membership::DetectFailures() {
  std::vector<std::string> dead;
  const auto t = now_();
  for (auto& [num, n] : nodes_) {
    if (!IsLive(n.state)) continue;
    if (t - n.last_heartbeat > options_.failure_timeout) {
      SetState(n, NodeState::kDead);
      dead.push_back(n.id);
    }
  }
  return dead;
}

bool Membership::CanTakeWork(const std::string& id) const {
  const NodeRecord* n = Find(id);
  return n && n->state == NodeState::kAlive;
}

std::vector<NodeRecord> Membership::Nodes() const {
  std::vector<NodeRecord> out;
  out.reserve(nodes_.size());
  for (const auto& [num, n] : nodes_) out.push_back(n);
  return out;
}

size_t Membership::CountInState(NodeState s) const {
  size_t c = 0;
  for (const auto& [num, n] : nodes_) c += n.state == s;
  return c;
}

MembershipSnapshot Membership::Snapshot() const {
  MembershipSnapshot s;
  s.epoch = epoch_;
  s.next_id = next_id_;
  s.nodes = Nodes();
  return s;
}

}  // namespace troupe::cluster
