// The node's transport bridge and the coordinator proxy.
#include <spdlog/spdlog.h>

#include "actors/node/node_actors.h"
#include "actors/transport/codec.h"
#include "actors/transport/socket.h"

namespace troupe::node {
namespace {

using namespace protocol;

constexpr int kPollMs = 20;
// A connection whose CURVE handshake has not completed in this long is
// rebuilt (ZeroMQ retries the TCP connect itself; this covers a socket stuck
// on a peer that went away mid-handshake).
constexpr std::chrono::seconds kHandshakeDeadline{5};

template <class T>
void Forward(caf::blocking_actor* self, const agent_actor& agent, const transport::Frame& f) {
  auto msg = transport::Deserialize<T>(f.payload);
  if (!msg.ok()) {
    spdlog::warn("bridge: dropped an undecodable frame of type {}: {}", f.type, msg.status().message());
    return;
  }
  self->send(agent, std::move(msg).value());
}

}  // namespace

void ClientBridge(caf::blocking_actor* self, std::string endpoint, std::string server_public_key,
                  transport::KeyPair keys, agent_actor agent) {
  std::unique_ptr<transport::SecureClient> client;
  bool handshake_known = false;
  bool ready = false;  // handshake done: sends go out (before it, a DEALER with no pipe would block)
  auto connected_at = std::chrono::steady_clock::now();
  transport::TransportOptions topts;
  topts.send_timeout_ms = 200;  // never stall the bridge on a vanished coordinator
  auto connect = [&] {
    client.reset();  // closes the old socket first (linger bounded by the transport)
    handshake_known = false;
    ready = false;
    connected_at = std::chrono::steady_clock::now();
    auto c = transport::SecureClient::Connect(endpoint, server_public_key, keys, topts);
    if (!c.ok()) {
      spdlog::error("bridge: cannot connect to {}: {}", endpoint, c.status().message());
      return;
    }
    client = std::move(c).value();
  };
  connect();
  bool running = true;
  while (running) {
    if (client) {
      if (!handshake_known) {
        Status hs = client->WaitForHandshake(1);
        if (hs.ok()) {
          handshake_known = true;
          ready = true;
          spdlog::info("bridge: CURVE handshake with {} done", endpoint);
        } else if (hs.message().find("no handshake") == std::string::npos) {
          handshake_known = true;
          spdlog::error("bridge: {}", hs.message());
          self->send(agent, JoinRefused{"the coordinator refused this node's key: " + hs.message()});
        } else if (std::chrono::steady_clock::now() - connected_at > kHandshakeDeadline) {
          spdlog::warn("bridge: no CURVE handshake with {} after {} s; rebuilding the socket", endpoint,
                       kHandshakeDeadline.count());
          connect();
          continue;
        }
      }
      auto in = client->Receive(kPollMs);
      if (!in.ok()) {
        spdlog::warn("bridge: receive failed: {}; reconnecting", in.status().message());
        connect();
      } else if (in->has_value()) {
        const transport::Frame& f = **in;
        switch (static_cast<MsgType>(f.type)) {
          case MsgType::kJoinAck: Forward<JoinAck>(self, agent, f); break;
          case MsgType::kJoinRefused: Forward<JoinRefused>(self, agent, f); break;
          case MsgType::kHeartbeatAck: Forward<HeartbeatAck>(self, agent, f); break;
          case MsgType::kDrain: Forward<Drain>(self, agent, f); break;
          case MsgType::kJobAssign: Forward<JobAssign>(self, agent, f); break;
          case MsgType::kStopJob: Forward<StopJob>(self, agent, f); break;
          case MsgType::kCheckpointPlan: Forward<CheckpointPlan>(self, agent, f); break;
          case MsgType::kShardCopy: Forward<ShardCopy>(self, agent, f); break;
          case MsgType::kShardCopyEnd: Forward<ShardCopyEnd>(self, agent, f); break;
          case MsgType::kShardFetch: Forward<ShardFetch>(self, agent, f); break;
          case MsgType::kDropCheckpoint: Forward<DropCheckpoint>(self, agent, f); break;
          case MsgType::kRankTable: Forward<RankTable>(self, agent, f); break;
          default: spdlog::warn("bridge: dropped a frame of unexpected type {}", f.type);
        }
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(kPollMs));
    }
    bool more = true;
    while (more && running) {
      more = false;
      self->receive(
          [&](send_atom, uint16_t type, Bytes& payload) {
            more = true;
            if (!client || !ready) return;  // the agent retries joins; heartbeats are periodic
            Status st = client->Send(type, std::move(payload));
            if (!st.ok()) spdlog::debug("bridge: send of type {} failed: {}", type, st.message());
          },
          [&](reconnect_atom) {
            spdlog::info("bridge: reconnecting to {}", endpoint);
            connect();
          },
          [&](stop_atom) { running = false; }, caf::after(std::chrono::milliseconds(0)) >> [] {});
    }
  }
  client.reset();
}

coordinator_actor::behavior_type CoordinatorProxy(coordinator_actor::pointer self, caf::actor bridge) {
  auto forward = [bridge](const auto& msg) {
    caf::anon_send(bridge, send_atom_v, static_cast<uint16_t>(msg.kType), transport::Serialize(msg));
  };
  return {
      [=](const Join& m) { forward(m); },
      [=](const Heartbeat& m) { forward(m); },
      [=](const Leave& m) { forward(m); },
      [=](const StepReport& m) { forward(m); },
      [=](const CheckpointBegin& m) { forward(m); },
      [=](const CheckpointWritten& m) { forward(m); },
      [=](const ShardCopy& m) { forward(m); },
      [=](const ShardCopyEnd& m) { forward(m); },
      [=](const ShardsDurable& m) { forward(m); },
      [=](const ShardFetch& m) { forward(m); },
      [=](const RankAddress& m) { forward(m); },
  };
}

}  // namespace troupe::node
