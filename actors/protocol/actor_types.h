// The actor-side view of the cluster protocol: atoms, message types and the
// typed interfaces that local actors talk through (CAF 0.17.6).
//
// Location transparency: `node_actor` is what the coordinator talks to for
// each node and `coordinator_actor` is what a node talks to. On the far side
// of the wire each is implemented by the real actor (the node's agent, the
// coordinator's membership actor); on the near side by a proxy actor that
// encodes the message (codec.h) and hands it to the process's transport
// bridge. Senders cannot tell the two apart.
//
// The protocol structs travel between processes only through our transport
// (cereal inside envelope frames), never through CAF's middleman, so they
// are whitelisted as local message types rather than given inspect().
#pragma once

#include <caf/all.hpp>

#include <memory>
#include <cstdint>
#include <string>
#include <vector>

#include "actors/protocol/messages.h"
#include "storage/checkpoint/checkpoint_io.h"

namespace troupe::protocol {

// A captured training state on its way from a trainer runner to the node's
// storage actor (and back from a restore): shared, never copied.
using SnapshotPtr = std::shared_ptr<ckpt::Snapshot>;

// Who sent a frame to the coordinator: the transport's routing id (to reply)
// and the CURVE public key it authenticated with (its identity).
struct PeerRef {
  std::string routing_id;
  std::string public_key;
};

}  // namespace troupe::protocol

CAF_BEGIN_TYPE_ID_BLOCK(troupe_cluster, caf::first_custom_type_id)
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, send_atom, "send")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, stop_atom, "stop")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, drain_atom, "drain")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, node_up_atom, "node_up")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, node_down_atom, "node_down")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, peer_atom, "peer")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, reconnect_atom, "reconnect")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, nodes_atom, "nodes")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, job_atom, "job")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, heartbeat_atom, "heartbeat")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, leave_atom, "leave")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, idle_atom, "idle")
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::PeerRef))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::Join))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::JoinAck))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::JoinRefused))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::Heartbeat))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::HeartbeatAck))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::Leave))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::Drain))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::JobAssign))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::StepReport))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::StopJob))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::CheckpointBegin))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::CheckpointPlan))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::CheckpointWritten))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::ShardCopy))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::ShardCopyEnd))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::ShardsDurable))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::ShardFetch))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::DropCheckpoint))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::SnapshotPtr))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::RankAddress))
  CAF_ADD_TYPE_ID(troupe_cluster, (troupe::protocol::RankTable))
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, save_atom, "save")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, restore_atom, "restore")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, joined_atom, "joined")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, timeout_atom, "timeout")
  CAF_ADD_ATOM(troupe_cluster, troupe::protocol, ckpt_atom, "ckpt")
CAF_END_TYPE_ID_BLOCK(troupe_cluster)

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::PeerRef)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::Join)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::JoinAck)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::JoinRefused)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::Heartbeat)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::HeartbeatAck)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::Leave)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::Drain)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::JobAssign)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::StepReport)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::StopJob)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::CheckpointBegin)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::CheckpointPlan)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::CheckpointWritten)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::ShardCopy)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::ShardCopyEnd)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::ShardsDurable)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::ShardFetch)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::DropCheckpoint)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::SnapshotPtr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::RankAddress)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::protocol::RankTable)

namespace troupe::protocol {

// A node as the coordinator sees it: the node's agent (remote) or, in the
// coordinator process, a node proxy forwarding over the transport.
using node_actor = caf::typed_actor<caf::reacts_to<JoinAck>, caf::reacts_to<JoinRefused>,
                                    caf::reacts_to<HeartbeatAck>, caf::reacts_to<Drain>, caf::reacts_to<JobAssign>,
                                    caf::reacts_to<StopJob>, caf::reacts_to<CheckpointPlan>,
                                    caf::reacts_to<ShardCopy>, caf::reacts_to<ShardCopyEnd>,
                                    caf::reacts_to<ShardFetch>, caf::reacts_to<DropCheckpoint>,
                                    caf::reacts_to<RankTable>>;

// The coordinator as a node sees it: in the node process, a coordinator
// proxy forwarding over the transport.
using coordinator_actor = caf::typed_actor<caf::reacts_to<Join>, caf::reacts_to<Heartbeat>, caf::reacts_to<Leave>,
                                           caf::reacts_to<StepReport>, caf::reacts_to<CheckpointBegin>,
                                           caf::reacts_to<CheckpointWritten>, caf::reacts_to<ShardCopy>,
                                           caf::reacts_to<ShardCopyEnd>, caf::reacts_to<ShardsDurable>,
                                           caf::reacts_to<ShardFetch>, caf::reacts_to<RankAddress>>;

// Outgoing frames for a transport bridge: (send_atom, peer, type, payload)
// on the coordinator, (send_atom, type, payload) on a node.
using Bytes = std::vector<uint8_t>;

}  // namespace troupe::protocol
