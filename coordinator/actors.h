// The coordinator process's actors and their typed protocols.
//
//   SecureServer ──frames──▶ server bridge (detached; owns the socket)
//                                │ (Join|Heartbeat|Leave|StepReport, PeerRef)
//                                ▼
//   HTTP thread ──request──▶ membership actor (Membership + StateStore)
//        │                       │ node_up / node_down / StepReport
//        │                       ▼
//        └──────request──▶ job actor (JobTracker + StateStore)
//                                │ JobAssign / StopJob
//                                ▼
//                          node proxy (one per node: a node_actor that
//                          encodes and hands frames to the server bridge)
//
// Every request made by these actors or the HTTP thread carries a timeout.
#pragma once

#include <atomic>
#include <caf/all.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "actors/protocol/actor_types.h"
#include "actors/transport/socket.h"
#include "configs/config.h"
#include "coordinator/checkpoint_keeper.h"
#include "coordinator/dist_job.h"
#include "coordinator/job_record.h"
#include "coordinator/membership.h"
#include "coordinator/state_store.h"

namespace troupe::cluster {

// Counters the HTTP API reads (any thread).
struct CoordinatorCounters {
  std::atomic<uint64_t> refused_connections{0};  // CURVE/ZAP refusals
  std::atomic<uint64_t> malformed_frames{0};     // envelope failures
  std::atomic<uint64_t> bad_messages{0};         // valid frames, undecodable or unexpected payloads
  std::atomic<uint64_t> frames_in{0};
  std::atomic<uint64_t> frames_out{0};
};

// HTTP-style answer of an actor: (status code, JSON body).
using ApiAnswer = std::pair<int, std::string>;

using job_actor = caf::typed_actor<
    caf::reacts_to<protocol::node_up_atom, std::string, protocol::node_actor, int32_t>,      // id, handle, workers
    caf::reacts_to<protocol::node_down_atom, std::string, std::string>,                      // id, why
    caf::reacts_to<protocol::StepReport>,                                                    // sender checked
    caf::reacts_to<protocol::CheckpointBegin>, caf::reacts_to<protocol::CheckpointWritten>,  // sender checked
    caf::reacts_to<protocol::ShardsDurable>,                                                 // sender checked
    caf::reacts_to<protocol::RankAddress>,                                                   // sender checked
    caf::reacts_to<caf::tick_atom>,                                                          // save timeouts
    caf::replies_to<protocol::ckpt_atom>::with<int, std::string>,                            // JSON: checkpoints
    caf::replies_to<caf::get_atom>::with<std::string>,                                       // JSON of the job
    caf::replies_to<protocol::stop_atom>::with<int, std::string>>;                           // status, JSON

using membership_actor = caf::typed_actor<
    caf::reacts_to<protocol::Join, protocol::PeerRef>, caf::reacts_to<protocol::Heartbeat, protocol::PeerRef>,
    caf::reacts_to<protocol::Leave, protocol::PeerRef>, caf::reacts_to<protocol::StepReport, protocol::PeerRef>,
    caf::reacts_to<protocol::CheckpointBegin, protocol::PeerRef>,
    caf::reacts_to<protocol::CheckpointWritten, protocol::PeerRef>,
    caf::reacts_to<protocol::ShardsDurable, protocol::PeerRef>,
    caf::reacts_to<protocol::ShardCopy, protocol::PeerRef>,  // relayed to `to_node`
    caf::reacts_to<protocol::ShardCopyEnd, protocol::PeerRef>, caf::reacts_to<protocol::ShardFetch, protocol::PeerRef>,
    caf::reacts_to<protocol::RankAddress, protocol::PeerRef>,
    caf::reacts_to<caf::tick_atom>,                     // failure detection
    caf::replies_to<caf::get_atom>::with<std::string>,  // JSON: epoch, counts, nodes
    caf::replies_to<protocol::drain_atom, std::string>::with<int, std::string>,
    caf::reacts_to<protocol::stop_atom>>;  // stops the bridge, then itself

// A node_actor for a remote node: encodes each message and gives it to the
// bridge for `routing_id`; (peer_atom, id) updates the routing id after a
// reconnect.
using node_proxy_actor = protocol::node_actor::extend<caf::reacts_to<protocol::peer_atom, std::string>>;

node_proxy_actor::behavior_type NodeProxy(node_proxy_actor::pointer self, caf::actor bridge, std::string routing_id);

// The server bridge: a blocking actor spawned detached. Owns `server`
// (only this thread touches it), polls it, turns frames into messages to
// `membership`, and sends (send_atom, peer, type, payload) from its mailbox.
// Stops on (stop_atom).
void ServerBridge(caf::blocking_actor* self, std::shared_ptr<transport::SecureServer> server,
                  membership_actor membership, std::shared_ptr<CoordinatorCounters> counters);

struct JobActorState {
  std::unique_ptr<JobTracker> tracker;
  std::shared_ptr<CheckpointKeeper> checkpoints;  // null: checkpoints unavailable (logged at start)
  std::shared_ptr<StateStore> store;
  std::map<std::string, protocol::node_actor> nodes;  // live nodes that may take work
  std::map<std::string, int32_t> workers;             // their worker counts
  int log_every = 10;                                 // print a step line every this many steps
  std::chrono::steady_clock::time_point last_save{};  // progress is saved at most once a second
  std::string shared_dir;     // distributed jobs' checkpoints: <shared_dir>/checkpoints (empty: none)
  RankRendezvous rendezvous;  // the running distributed attempt's
  std::string waiting;        // why a distributed job waits for workers (printed once per reason)
  int grow_to_dp = 0;         // > 0: the live workers allow this many replicas; replan at the next checkpoint
  std::optional<JobConfig>
      config;  // the job's, parsed once (the record's text never changes); none if it does not parse
  static inline const char* name = "job";
};
// `checkpoints` may be null (the catalog could not be opened): the job then
// runs without checkpoints. `shared_dir`: a folder every node reaches, where
// a distributed job's ranks write its checkpoints (empty: they keep none).
job_actor::behavior_type JobActor(job_actor::stateful_pointer<JobActorState> self, JobRecord record,
                                  std::shared_ptr<StateStore> store, std::shared_ptr<CheckpointKeeper> checkpoints,
                                  std::string shared_dir);

struct MembershipActorState {
  std::unique_ptr<Membership> membership;
  std::shared_ptr<StateStore> store;
  job_actor job;
  caf::actor bridge;
  std::map<std::string, node_proxy_actor> proxies;  // node id -> proxy (kept for the coordinator's life)
  std::map<std::string, std::string> routing;       // node id -> current transport routing id
  std::shared_ptr<CoordinatorCounters> counters;
  uint64_t saved_epoch = 0;
  Clock::time_point started{};
  static inline const char* name = "membership";
};
membership_actor::behavior_type MembershipActor(membership_actor::stateful_pointer<MembershipActorState> self,
                                                Membership membership, std::shared_ptr<StateStore> store, job_actor job,
                                                std::shared_ptr<transport::SecureServer> server,
                                                std::shared_ptr<CoordinatorCounters> counters);

}  // namespace troupe::cluster
