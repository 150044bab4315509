// The coordinator <-> node protocol: one cereal struct per message, each
// with its wire type number (transport/messages.h reserves 256.. for us).
// Payloads are codec.h blobs inside transport frames (envelope.h).
//
//   node                                   coordinator
//   ────                                   ───────────
//   Join{name, host, devices, ..}  ──────▶
//                                  ◀──────  JoinAck{node_id, epoch, timings}
//                                  ◀──────  JoinRefused{reason}
//   Heartbeat{node_id, seq} /0.5 s ──────▶
//                                  ◀──────  HeartbeatAck{epoch, known}
//                                  ◀──────  JobAssign{attempt, worker, config}
//   StepReport{attempt, step, ..}  ──────▶  (after every step)
//                                  ◀──────  StopJob{attempt, worker}
//                                  ◀──────  Drain{}
//   Leave{node_id, reason}         ──────▶
//
// Checkpoints (docs/checkpoints.md, "In a cluster"): the writer's node asks
// for an id and replicas, writes its own copy, pushes copies to the replicas
// through the coordinator (which relays ShardCopy/ShardCopyEnd/ShardFetch by
// `to_node`, after checking that the frame's key is `from_node`'s), and the
// coordinator commits once every replica has synced:
//   CheckpointBegin{attempt, step}  ──────▶
//                                  ◀──────  CheckpointPlan{id, replicas}
//   CheckpointWritten{manifest}     ──────▶
//   ShardCopy.. ShardCopyEnd        ──────▶  relayed to each replica
//   (replica) ShardsDurable{id}     ──────▶  all durable: manifest committed
//                                  ◀──────  DropCheckpoint{id} (retention, abandoned saves)
//   (restore) ShardFetch{keys}      ──────▶  relayed to a holder, which answers
//                                            with ShardCopy.. ShardCopyEnd
//
// Compatibility: a struct's field list is append-only within one wire
// version; a change in meaning takes a new type number.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>

namespace troupe::protocol {

enum class MsgType : uint16_t {
  kJoin = 256,
  kJoinAck = 257,
  kJoinRefused = 258,
  kHeartbeat = 259,
  kHeartbeatAck = 260,
  kLeave = 261,
  kDrain = 262,
  kJobAssign = 263,
  kStepReport = 264,
  kStopJob = 265,
  kCheckpointBegin = 266,
  kCheckpointPlan = 267,
  kCheckpointWritten = 268,
  kShardCopy = 269,
  kShardCopyEnd = 270,
  kShardsDurable = 271,
  kShardFetch = 272,
  kDropCheckpoint = 273,
  kRankAddress = 274,
  kRankTable = 275,
};

struct DeviceDesc {
  std::string kind;          // "cuda" | "cpu"
  std::string name;
  int64_t memory_bytes = 0;
  template <class Archive>
  void serialize(Archive& ar) { ar(kind, name, memory_bytes); }
};

// node -> coordinator: admit me (first contact, and after every reconnect).
struct Join {
  static constexpr MsgType kType = MsgType::kJoin;
  std::string name;          // the node's key name: its identity
  std::string host;
  std::vector<DeviceDesc> devices;
  int64_t memory_bytes = 0;
  int32_t capacity = 0;      // workers (one per device)
  uint64_t incarnation = 0;  // random per process start
  template <class Archive>
  void serialize(Archive& ar) { ar(name, host, devices, memory_bytes, capacity, incarnation); }
};

// coordinator -> node: admitted.
struct JoinAck {
  static constexpr MsgType kType = MsgType::kJoinAck;
  std::string node_id;
  uint64_t epoch = 0;
  uint32_t heartbeat_ms = 500;
  uint32_t failure_timeout_ms = 3000;
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, epoch, heartbeat_ms, failure_timeout_ms); }
};

// coordinator -> node: not admitted (e.g. the name belongs to another key).
struct JoinRefused {
  static constexpr MsgType kType = MsgType::kJoinRefused;
  std::string reason;
  template <class Archive>
  void serialize(Archive& ar) { ar(reason); }
};

// node -> coordinator, every heartbeat_ms.
struct Heartbeat {
  static constexpr MsgType kType = MsgType::kHeartbeat;
  std::string node_id;
  uint64_t incarnation = 0;
  uint64_t sequence = 0;
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, incarnation, sequence); }
};

// coordinator -> node. known == false: join again (unknown, dead, or
// another process of this node).
struct HeartbeatAck {
  static constexpr MsgType kType = MsgType::kHeartbeatAck;
  uint64_t epoch = 0;
  uint64_t sequence = 0;
  bool known = true;
  template <class Archive>
  void serialize(Archive& ar) { ar(epoch, sequence, known); }
};

// node -> coordinator: leaving cleanly.
struct Leave {
  static constexpr MsgType kType = MsgType::kLeave;
  std::string node_id;
  uint64_t incarnation = 0;
  std::string reason;
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, incarnation, reason); }
};

// coordinator -> node: finish (stop workers) and leave.
struct Drain {
  static constexpr MsgType kType = MsgType::kDrain;
  std::string reason;
  template <class Archive>
  void serialize(Archive& ar) { ar(reason); }
};

// coordinator -> node: run this training job on worker `worker`.
struct JobAssign {
  static constexpr MsgType kType = MsgType::kJobAssign;
  uint64_t attempt = 0;
  int32_t worker = 0;
  std::string config_name;
  std::string toml_text;     // the whole config; shard paths as written
  std::string resume_manifest;          // JSON of the checkpoint to resume from (empty: step 0)
  std::vector<std::string> live_nodes;  // nodes a restore may fetch shards from
  // A distributed job (world > 1): this worker runs rank `rank` of `world`,
  // in the layout the coordinator planned for them (parallel.dp resolved).
  int32_t rank = 0;
  int32_t world = 1;
  int32_t dp = 1;
  std::string checkpoint_dir;  // the job's shared checkpoint folder (empty: none)
  std::string resume_id;       // distributed: the checkpoint in it to resume from (empty: step 0)
  bool ranked = false;         // a rank of a distributed job (world may be 1 when the job shrank to one worker)
  template <class Archive>
  void serialize(Archive& ar) {
    ar(attempt, worker, config_name, toml_text, resume_manifest, live_nodes, rank, world, dp, checkpoint_dir,
       resume_id, ranked);
  }
};

// node -> coordinator: after every optimizer step (and on failure).
struct StepReport {
  static constexpr MsgType kType = MsgType::kStepReport;
  std::string node_id;
  uint64_t attempt = 0;
  int32_t worker = 0;
  int32_t step = 0;
  int32_t total_steps = 0;
  double loss = 0, main_loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0;
  double val_loss = -1;      // < 0: not evaluated after this step
  bool done = false;         // the last step
  std::string error;         // non-empty: the attempt failed
  double unigram_baseline = -1;  // with val_loss: the context-free baseline it must beat
  int32_t rank = 0;              // distributed: the rank reporting (progress comes from rank 0, errors from any)
  std::string checkpoint_id;     // distributed, rank 0: a checkpoint committed since the last report
  int32_t checkpoint_step = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(node_id, attempt, worker, step, total_steps, loss, main_loss, lr, grad_norm, tokens_per_s, val_loss, done,
       error, unigram_baseline, rank, checkpoint_id, checkpoint_step);
  }
};

// coordinator -> node: stop attempt `attempt` on `worker`.
struct StopJob {
  static constexpr MsgType kType = MsgType::kStopJob;
  uint64_t attempt = 0;
  int32_t worker = 0;
  std::string reason;
  template <class Archive>
  void serialize(Archive& ar) { ar(attempt, worker, reason); }
};

// node -> coordinator: attempt `attempt` captured the state after `step`;
// give the save an id and replicas.
struct CheckpointBegin {
  static constexpr MsgType kType = MsgType::kCheckpointBegin;
  std::string node_id;
  uint64_t attempt = 0;
  int64_t step = 0;
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, attempt, step); }
};

// coordinator -> node: write `id` here and copy it to `replicas` (other
// nodes). An empty id refuses the save (`reason` says why).
struct CheckpointPlan {
  static constexpr MsgType kType = MsgType::kCheckpointPlan;
  uint64_t attempt = 0;
  int64_t step = 0;
  std::string id;
  std::vector<std::string> replicas;
  int32_t shards_per_tensor = 1;
  std::string reason;
  template <class Archive>
  void serialize(Archive& ar) { ar(attempt, step, id, replicas, shards_per_tensor, reason); }
};

// node -> coordinator: this node's copy is durable; `manifest` (JSON) names
// only this node as a store so far. Non-empty `error`: the save failed.
struct CheckpointWritten {
  static constexpr MsgType kType = MsgType::kCheckpointWritten;
  std::string node_id;
  uint64_t attempt = 0;
  std::string id;
  std::string manifest;
  std::string error;
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, attempt, id, manifest, error); }
};

// node -> (coordinator) -> node: one shard's bytes.
struct ShardCopy {
  static constexpr MsgType kType = MsgType::kShardCopy;
  std::string from_node, to_node;
  std::string id;
  std::string tensor;
  int64_t row_begin = 0, row_end = 0;
  uint32_t crc32c = 0;
  std::vector<uint8_t> bytes;
  template <class Archive>
  void serialize(Archive& ar) { ar(from_node, to_node, id, tensor, row_begin, row_end, crc32c, bytes); }
};

// node -> (coordinator) -> node: the last ShardCopy of a batch. `fetch`:
// the batch answers a ShardFetch (a restore), else it is a replication.
// `errors`: shards the sender could not read, one line each.
struct ShardCopyEnd {
  static constexpr MsgType kType = MsgType::kShardCopyEnd;
  std::string from_node, to_node;
  std::string id;
  int64_t shards = 0;  // ShardCopy messages sent in this batch
  bool fetch = false;
  std::vector<std::string> errors;
  template <class Archive>
  void serialize(Archive& ar) { ar(from_node, to_node, id, shards, fetch, errors); }
};

// replica node -> coordinator: every shard of `id` it was sent is synced
// (or, with `error`, is not).
struct ShardsDurable {
  static constexpr MsgType kType = MsgType::kShardsDurable;
  std::string node_id;
  std::string id;
  int64_t shards = 0;
  std::string error;
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, id, shards, error); }
};

struct ShardWant {
  std::string tensor;
  int64_t row_begin = 0, row_end = 0;
  template <class Archive>
  void serialize(Archive& ar) { ar(tensor, row_begin, row_end); }
};

// node -> (coordinator) -> node: send me these shards of `id`
// (from_node asks, to_node holds them).
struct ShardFetch {
  static constexpr MsgType kType = MsgType::kShardFetch;
  std::string from_node, to_node;
  std::string id;
  std::vector<ShardWant> shards;
  template <class Archive>
  void serialize(Archive& ar) { ar(from_node, to_node, id, shards); }
};

// coordinator -> node: delete every shard of `id` (expired or abandoned).
struct DropCheckpoint {
  static constexpr MsgType kType = MsgType::kDropCheckpoint;
  std::string id;
  template <class Archive>
  void serialize(Archive& ar) { ar(id); }
};

// A distributed job's rendezvous (docs/cluster.md, "Distributed jobs"): each
// rank's process group listens on its node and tells the coordinator where,
// and with which CURVE key; once every rank of the attempt has, the
// coordinator hands the whole table to each of them. Round 0 carries the
// addresses, round 1 says "my server admits every key" (process_group.h).
//   RankAddress{attempt, rank, round, endpoint, key} ──────▶  (every rank)
//                                  ◀──────  RankTable{attempt, worker, round, endpoints, keys}

// node -> coordinator.
struct RankAddress {
  static constexpr MsgType kType = MsgType::kRankAddress;
  std::string node_id;
  uint64_t attempt = 0;
  int32_t rank = 0;
  int32_t round = 0;       // the round reached: an entry of round 1 stands for round 0 too
  std::string endpoint;    // tcp://HOST:PORT
  std::string public_key;  // Z85, 40 characters
  int32_t worker = 0;      // the worker running the rank (a stale one is told to stop)
  template <class Archive>
  void serialize(Archive& ar) { ar(node_id, attempt, rank, round, endpoint, public_key, worker); }
};

// coordinator -> node: for the rank that `worker` runs.
struct RankTable {
  static constexpr MsgType kType = MsgType::kRankTable;
  uint64_t attempt = 0;
  int32_t worker = 0;
  int32_t round = 0;
  std::vector<std::string> endpoints, public_keys;  // by rank (round 0)
  template <class Archive>
  void serialize(Archive& ar) { ar(attempt, worker, round, endpoints, public_keys); }
};

}  // namespace troupe::protocol
