// The node process's actors.
//
//   SecureClient ◀──▶ client bridge (detached; owns the socket; reconnects)
//        frames          │ JoinAck | HeartbeatAck | JobAssign | StopJob | Drain
//                        ▼
//   coordinator proxy ◀── agent (lifecycle: joining ⇄ running → leaving)
//   (coordinator_actor:    │ JobAssign / StopJob          ▲ StepReport
//    encodes, hands to     ▼                              │
//    the bridge)        worker 0..N-1 (one per GPU or CPU slot)
//                          │ spawns, detached, one per attempt
//                          ▼
//                       trainer runner (Trainer::Step off the actor threads), or,
//                       for a distributed job, rank runner: one rank's pipeline
//                       stages (DistributedTrainer), its process group reaching
//                       the other ranks' runners; RankAddress/RankTable through
//                       the coordinator find them
//                          │ save (snapshot) / restore (manifest)
//                          ▼
//                       storage actor (detached: disk I/O on its own thread;
//                       the node's ShardStore under <data>/store; writes,
//                       replicates, serves and fetches checkpoint shards)
#pragma once

#include <atomic>
#include <caf/all.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "actors/protocol/actor_types.h"
#include "actors/transport/keys.h"
#include "common/status.h"
#include "configs/config.h"
#include "gpu/backend.h"

namespace troupe::parallel {
class ProcessGroup;
}

namespace troupe::node {

// How the node process ends (set once by the agent; read by RunNode).
struct NodeOutcome {
  std::atomic<bool> done{false};
  std::mutex mu;
  int exit_code = 0;    // 0: drained / stopped; 1: refused
  std::string message;  // why, for the error line
  void Set(int code, std::string msg) {
    std::lock_guard<std::mutex> lock(mu);
    if (done) return;
    exit_code = code;
    message = std::move(msg);
    done = true;
  }
};

struct WorkerDevice {
  std::string kind;  // "cuda" | "cpu"
  int index = 0;     // GPU ordinal or CPU slot number
  std::string name;
  int64_t memory_bytes = 0;
};

// The node's checkpoint shards (docs/checkpoints.md, "In a cluster").
// Replies to the runner that asked: (save_atom, id, error) once its own copy
// is written and the replicas' copies are on their way; (restore_atom,
// SnapshotPtr, error) when every shard is here and verified.
using storage_actor = caf::typed_actor<
    caf::reacts_to<protocol::joined_atom, std::string>,                                // the node id, after a join
    caf::reacts_to<protocol::save_atom, uint64_t, protocol::SnapshotPtr, caf::actor>,  // attempt, state, runner
    caf::reacts_to<protocol::restore_atom, protocol::JobAssign, caf::actor>,           // its resume_manifest, runner
    caf::reacts_to<protocol::CheckpointPlan>, caf::reacts_to<protocol::ShardCopy>,
    caf::reacts_to<protocol::ShardCopyEnd>, caf::reacts_to<protocol::ShardFetch>,
    caf::reacts_to<protocol::DropCheckpoint>, caf::reacts_to<protocol::timeout_atom, std::string>>;

// Spawns (detached, linked to `parent`) the storage actor of <dir>/store (a
// ShardStore); it fails every request with a clear error if the store
// cannot be opened.
storage_actor SpawnStorage(caf::local_actor* parent, std::string dir, protocol::coordinator_actor coordinator);

using worker_actor = caf::typed_actor<caf::reacts_to<protocol::JobAssign>, caf::reacts_to<protocol::StopJob>,
                                      caf::reacts_to<protocol::StepReport>,   // from its runner
                                      caf::reacts_to<protocol::RankAddress>,  // from its rank runner
                                      caf::reacts_to<protocol::RankTable>,    // for its rank runner
                                      caf::reacts_to<protocol::stop_atom>>;

using agent_actor = protocol::node_actor::extend<caf::reacts_to<caf::tick_atom>,         // timer
                                                 caf::reacts_to<protocol::StepReport>,   // from workers
                                                 caf::reacts_to<protocol::RankAddress>,  // from workers
                                                 caf::reacts_to<protocol::stop_atom>>;   // leave and quit

struct AgentConfig {
  std::string name;               // key name: the node's identity
  std::string endpoint;           // tcp://HOST:PORT of the coordinator
  std::string server_public_key;  // pinned
  transport::KeyPair keys;
  std::vector<WorkerDevice> devices;
  int64_t memory_bytes = 0;
  int cpu_threads = 0;                  // per CPU worker (0 = the config's)
  std::string data_dir;                 // checkpoint shards go to <data_dir>/store (empty: this node keeps none)
  std::string rank_host = "127.0.0.1";  // where a distributed job's ranks listen (an address the other nodes reach)
};

struct AgentState {
  AgentConfig config;
  std::shared_ptr<NodeOutcome> outcome;
  uint64_t incarnation = 0;
  std::string node_id;
  caf::actor bridge;
  protocol::coordinator_actor coordinator;  // the proxy
  std::vector<worker_actor> workers;
  storage_actor storage;  // null without a data dir
  std::chrono::milliseconds heartbeat{500};
  std::chrono::milliseconds timeout{3000};
  std::chrono::steady_clock::time_point last_contact{}, last_heartbeat{}, next_join{};
  std::chrono::milliseconds backoff{250};
  uint64_t sequence = 0;
  bool leaving = false;
  static inline const char* name = "agent";
};

agent_actor::behavior_type Agent(agent_actor::stateful_pointer<AgentState> self, AgentConfig config,
                                 std::shared_ptr<NodeOutcome> outcome);

// What a worker shares with its runner: the stop flag and, for a rank
// runner, its process group, aborted on stop so that a rank blocked on a
// peer returns at once. Thread-safe.
class RunControl {
 public:
  void Stop(const std::string& why);
  bool stopped() const { return stopped_.load(); }
  // The runner's group while it exists (nullptr before destroying it).
  void SetGroup(parallel::ProcessGroup* group);

 private:
  std::atomic<bool> stopped_{false};
  std::mutex mu_;
  parallel::ProcessGroup* group_ = nullptr;
  std::string why_;
};

struct WorkerState {
  int index = 0;
  WorkerDevice device;
  agent_actor agent;
  storage_actor storage;
  int cpu_threads = 0;
  std::string rank_host;
  uint64_t attempt = 0;                        // running attempt (0: idle)
  std::shared_ptr<RunControl> control;         // the running attempt's
  caf::actor runner;                           // alive until its down message (a stopped one may still be ending)
  std::optional<protocol::JobAssign> pending;  // starts once the previous runner is down
  static inline const char* name = "worker";
};
worker_actor::behavior_type Worker(worker_actor::stateful_pointer<WorkerState> self, int index, WorkerDevice device,
                                   agent_actor agent, storage_actor storage, int cpu_threads, std::string rank_host);

// The backend a worker's device gives a job: its GPU, or a CPU backend of
// `cpu_threads` (0: the config's threads). A config that insists on the
// other kind of device is refused, naming the worker.
Expected<std::unique_ptr<Backend>> MakeWorkerBackend(const WorkerDevice& device, const TrainConfig& train, int worker,
                                                     int cpu_threads);

// Runs one attempt: parses the config, builds the Trainer, restores the
// job's checkpoint if it names one, steps until the end or a stop,
// reporting each step to `worker` and saving every checkpoint.every steps
// through `storage`. Spawned detached.
void TrainerRunner(caf::blocking_actor* self, protocol::JobAssign job, WorkerDevice device, worker_actor worker,
                   storage_actor storage, std::shared_ptr<RunControl> control, int cpu_threads);

// Runs rank job.rank of a distributed attempt: plans the same layout as
// every other rank, finds them through the coordinator (RankAddress to
// `worker`, RankTable back), runs its pipeline stages over a CURVE ZeroMQ
// process group, resumes from job.resume_id and checkpoints into
// job.checkpoint_dir (collectively, DistCheckpointer). Rank 0 reports every
// step; any rank reports its failure. Spawned detached.
void RankRunner(caf::blocking_actor* self, protocol::JobAssign job, WorkerDevice device, worker_actor worker,
                std::shared_ptr<RunControl> control, int cpu_threads, std::string rank_host);

// Owns the SecureClient. Frames in -> messages to `agent`; (send_atom, type,
// payload) out; (reconnect_atom) recreates the socket; (stop_atom) ends.
// A refused handshake is reported to the agent as JoinRefused.
void ClientBridge(caf::blocking_actor* self, std::string endpoint, std::string server_public_key,
                  transport::KeyPair keys, agent_actor agent);

// coordinator_actor that encodes each message and hands it to `bridge`.
protocol::coordinator_actor::behavior_type CoordinatorProxy(protocol::coordinator_actor::pointer self,
                                                            caf::actor bridge);

}  // namespace troupe::node
