// The server bridge (frames <-> actor messages) and the node proxy.
#include <spdlog/spdlog.h>

#include "actors/transport/codec.h"
#include "coordinator/actors.h"

namespace troupe::cluster {
namespace {

using namespace protocol;

constexpr int kPollMs = 20;  // socket wait per loop: bounds the latency of outgoing frames

// Decodes a payload of type T and sends (T, peer) to `dest`; false if undecodable.
template <class T>
bool Forward(caf::blocking_actor* self, const membership_actor& dest, const transport::Incoming& in) {
  auto msg = transport::Deserialize<T>(in.frame.payload);
  if (!msg.ok()) {
    spdlog::warn("bridge: dropped an undecodable frame of type {} from key {}: {}", in.frame.type,
                 in.peer_public_key.substr(0, 8), msg.status().message());
    return false;
  }
  self->send(dest, std::move(msg).value(), PeerRef{in.peer, in.peer_public_key});
  return true;
}

}  // namespace

void ServerBridge(caf::blocking_actor* self, std::shared_ptr<transport::SecureServer> server,
                  membership_actor membership, std::shared_ptr<CoordinatorCounters> counters) {
  bool running = true;
  uint64_t io_errors = 0;
  while (running) {
    auto in = server->Receive(kPollMs);
    if (!in.ok()) {
      if (io_errors++ % 100 == 0) spdlog::error("bridge: receive failed: {}", in.status().message());
    } else if (in->has_value()) {
      const transport::Incoming& msg = **in;
      counters->frames_in++;
      bool ok = false;
      switch (static_cast<MsgType>(msg.frame.type)) {
        case MsgType::kJoin: ok = Forward<Join>(self, membership, msg); break;
        case MsgType::kHeartbeat: ok = Forward<Heartbeat>(self, membership, msg); break;
        case MsgType::kLeave: ok = Forward<Leave>(self, membership, msg); break;
        case MsgType::kStepReport: ok = Forward<StepReport>(self, membership, msg); break;
        case MsgType::kCheckpointBegin: ok = Forward<CheckpointBegin>(self, membership, msg); break;
        case MsgType::kCheckpointWritten: ok = Forward<CheckpointWritten>(self, membership, msg); break;
        case MsgType::kShardsDurable: ok = Forward<ShardsDurable>(self, membership, msg); break;
        case MsgType::kShardCopy: ok = Forward<ShardCopy>(self, membership, msg); break;
        case MsgType::kShardCopyEnd: ok = Forward<ShardCopyEnd>(self, membership, msg); break;
        case MsgType::kShardFetch: ok = Forward<ShardFetch>(self, membership, msg); break;
        case MsgType::kRankAddress: ok = Forward<RankAddress>(self, membership, msg); break;
        default:
          spdlog::warn("bridge: dropped a frame of unexpected type {} from key {}", msg.frame.type,
                       msg.peer_public_key.substr(0, 8));
      }
      if (!ok) counters->bad_messages++;
    }
    // Everything queued for sending, then back to the socket.
    bool more = true;
    while (more && running) {
      more = false;
      self->receive(
          [&](send_atom, const std::string& peer, uint16_t type, Bytes& payload) {
            more = true;
            Status st = server->Send(peer, type, std::move(payload));
            if (st.ok())
              counters->frames_out++;
            else
              spdlog::debug("bridge: send of type {} failed: {}", type, st.message());
          },
          [&](stop_atom) { running = false; },
          caf::after(std::chrono::milliseconds(0)) >> [] {});
    }
    counters->refused_connections = server->refused_count();
    counters->malformed_frames = server->malformed_count();
  }
  spdlog::info("bridge: stopped");
}

node_proxy_actor::behavior_type NodeProxy(node_proxy_actor::pointer self, caf::actor bridge, std::string routing_id) {
  auto peer = std::make_shared<std::string>(std::move(routing_id));
  auto forward = [self, bridge, peer](const auto& msg) {
    caf::anon_send(bridge, send_atom_v, *peer, static_cast<uint16_t>(msg.kType), transport::Serialize(msg));
  };
  return {
      [=](const JoinAck& m) { forward(m); },
      [=](const JoinRefused& m) { forward(m); },
      [=](const HeartbeatAck& m) { forward(m); },
      [=](const Drain& m) { forward(m); },
      [=](const JobAssign& m) { forward(m); },
      [=](const StopJob& m) { forward(m); },
      [=](const CheckpointPlan& m) { forward(m); },
      [=](const ShardCopy& m) { forward(m); },
      [=](const ShardCopyEnd& m) { forward(m); },
      [=](const ShardFetch& m) { forward(m); },
      [=](const DropCheckpoint& m) { forward(m); },
      [=](const RankTable& m) { forward(m); },
      [=](peer_atom, const std::string& id) { *peer = id; },
  };
}

}  // namespace troupe::cluster
