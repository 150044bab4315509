// Membership: who is in the cluster, in what state, and since when.
//
// A plain class (no actors, no sockets, no threads): the coordinator's
// membership actor owns one and feeds it what arrives from the transport;
// tests drive it with a fake clock.
//
// Node lifecycle (every arrow increments the membership epoch):
//
//            Join                 Drain                 Leave
//   (none) ───────▶ alive ───────────────▶ draining ─────────────▶ left
//                   ▲  │  ▲                   │
//        heartbeat  │  │  │ Join (same name,  │ no heartbeat for
//   (after restart) │  │  │ any state)        │ failure_timeout
//              unconfirmed│                   ▼
//                      └──────────────────▶ dead
//                       no heartbeat for failure_timeout
//
// A node is identified by its name (the name of its key pair, so one
// identity per key): a node that joins again under a name already known gets
// its old id back ("rejoin"), whatever state the old entry was in. Each
// process start carries a fresh random `incarnation`; a join with a new
// incarnation means the previous process of that node is gone, and
// everything it was running is lost.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace troupe::cluster {

using Clock = std::chrono::steady_clock;
// The time source; tests inject a fake one.
using ClockFn = std::function<Clock::time_point()>;

enum class NodeState : uint8_t {
  kAlive,        // heartbeats arrive; may take work
  kUnconfirmed,  // known from the durable snapshot of a restarted coordinator; no heartbeat yet
  kDraining,     // alive, takes no new work, leaves when told
  kDead,         // missed heartbeats for failure_timeout
  kLeft,         // left cleanly
};
const char* NodeStateName(NodeState s);
Expected<NodeState> ParseNodeState(std::string_view name);

// One compute device of a node: a GPU, or a CPU slot.
struct Device {
  std::string kind;           // "cuda" or "cpu"
  std::string name;           // "NVIDIA H100 80GB HBM3" or "cpu slot 0"
  int64_t memory_bytes = 0;   // device memory (0 for CPU slots)
};

// What a node says about itself when it joins.
struct NodeSpec {
  std::string name;            // its key name ("node1"): the node's stable identity
  std::string host;            // hostname, for people
  std::vector<Device> devices; // one worker per device
  int64_t memory_bytes = 0;    // host RAM
  int capacity = 0;            // workers it runs (== devices.size())
  uint64_t incarnation = 0;    // random per process start
  std::string public_key;      // the CURVE key it authenticated with ("" in tests)
};

struct NodeRecord {
  std::string id;                 // "n1", "n2", ...: assigned by the coordinator
  NodeSpec spec;
  NodeState state = NodeState::kAlive;
  Clock::time_point last_heartbeat{};  // last join or heartbeat (or the reload time)
  uint64_t joined_epoch = 0;      // epoch of its last join
};

struct MembershipOptions {
  std::chrono::milliseconds heartbeat_interval{500};  // what nodes are told to use
  std::chrono::milliseconds failure_timeout{3000};    // silence after which a node is dead
};

struct JoinResult {
  std::string node_id;
  uint64_t epoch = 0;
  bool rejoined = false;          // the name was known already
  bool new_incarnation = false;   // rejoined from a new process: its old work is lost
};

// The durable part of Membership (what the state store writes).
struct MembershipSnapshot {
  uint64_t epoch = 0;
  uint64_t next_id = 1;
  std::vector<NodeRecord> nodes;  // last_heartbeat is not durable
};

// The most workers a node may bring (GPUs or CPU slots): a larger claim is refused at join.
inline constexpr int kMaxCapacity = 1024;

class Membership {
 public:
  explicit Membership(MembershipOptions options = {}, ClockFn now = nullptr);

  // Rebuilds from a snapshot of a previous coordinator: live nodes become
  // kUnconfirmed with their heartbeat clock restarted now (so they are dead
  // after failure_timeout unless they speak); dead/left stay so. The epoch
  // continues from the snapshot's, plus one (a restart is a change).
  static Membership Restore(const MembershipSnapshot& snap, MembershipOptions options = {}, ClockFn now = nullptr);

  // Admits a node. InvalidArgument on an empty name or capacity < 0;
  // PermissionDenied-like InvalidArgument when the name is known with another
  // public key (a key may not take over another node's identity).
  Expected<JoinResult> Join(const NodeSpec& spec);

  // Records a heartbeat. NotFound when the id is unknown, the node is dead
  // or left, or the incarnation differs: the node must join again.
  // kUnconfirmed -> kAlive (an epoch change).
  Status Heartbeat(const std::string& id, uint64_t incarnation);

  // Clean leave. NotFound for an unknown id; leaving twice is OK.
  Status Leave(const std::string& id);

  // Marks a live node draining. NotFound for unknown ids;
  // InvalidArgument for dead or left nodes. Draining twice is OK.
  Status Drain(const std::string& id);

  // Declares dead every alive/unconfirmed/draining node silent for longer
  // than failure_timeout; returns their ids (one epoch change per node).
  std::vector<std::string> DetectFailures();

  // Alive (not draining, not unconfirmed): may be given new work.
  bool CanTakeWork(const std::string& id) const;
  const NodeRecord* Find(const std::string& id) const;
  std::vector<NodeRecord> Nodes() const;  // ordered by id number
  size_t CountInState(NodeState s) const;
  uint64_t epoch() const { return epoch_; }
  const MembershipOptions& options() const { return options_; }
  Clock::time_point Now() const { return now_(); }

  MembershipSnapshot Snapshot() const;

 private:
  NodeRecord* FindMutable(const std::string& id);
  void SetState(NodeRecord& n, NodeState s);

  MembershipOptions options_;
  ClockFn now_;
  uint64_t epoch_ = 0;
  uint64_t next_id_ = 1;
  std::map<uint64_t, NodeRecord> nodes_;  // by id number, so listings are in join order
};

}  // namespace troupe::cluster
