// Authenticated, encrypted frame sockets between Troupe processes.
//
//   SecureServer: ZeroMQ ROUTER, CURVE server, ZAP allow-list of client keys
//   SecureClient: ZeroMQ DEALER, CURVE client pinned to the server's key
//
//   client process                         server process
//   ┌──────────────┐  CURVE (encrypted,   ┌──────────────────────────────┐
//   │ SecureClient │── server key pinned)─▶ SecureServer (ROUTER)        │
//   │   DEALER     │◀─────────────────────│   ├ ZAP thread: inproc://    │
//   └──────────────┘  frames: envelope.h  │   │  zeromq.zap.01, allow-list│
//                                         │   └ monitor: handshake fails │
//                                         └──────────────────────────────┘
//
// Authentication: CURVE alone only encrypts; every client key would be
// accepted. The server therefore sets a non-empty ZMQ_ZAP_DOMAIN and serves
// ZAP on its own thread inside its own zmq context: a handshake succeeds only
// for client public keys in the allow-list. Denied keys (and clients that do
// not speak CURVE at all) never get a message through; they are counted and
// reported (refused_count, last_refused_key, SetRefusalHandler).
//
// Frames: every message is an envelope (envelope.h). Payloads up to 64 KiB
// travel as one ZeroMQ part (header + payload: one CURVE box); larger ones
// as two parts, header then payload. Frames that fail validation are counted
// (malformed_count) and dropped; Receive never returns them.
//
// Threads: a SecureServer or SecureClient is NOT thread-safe. One thread owns
// it: it calls Bind/Connect, Send, Receive, WaitForHandshake and destroys it
// (e.g. a detached CAF actor or a dedicated poll thread that forwards frames
// into the actor system). The exceptions, safe from any thread, are marked
// "any thread" below (allow-list edits, counters, refusal reporting).
//
// Copies per message (payload of N bytes):
//   send, N <= 64 KiB:         1 copy (header and payload into one message)
//   send, Send(span), larger:  1 copy into a zmq message (caller keeps its buffer)
//   send, Send(vector&&), larger: 0 copies: the vector is moved into the
//                              message (zmq_msg_init_data with a free function)
//   CURVE encrypt / decrypt:   libzmq writes ciphertext and plaintext into new
//                              buffers: 1 copy each way, unavoidable with CURVE
//   receive:                   1 copy from the zmq message into Frame::payload
//   CRC32C:                    one read pass on each side, no copy
//
// Liveness: ZMTP heartbeats are off by default (heartbeat_ivl_ms = 0);
// detecting dead peers is the cluster layer's job (heartbeat messages).
// Shutdown: ZMQ_LINGER bounds how long destruction waits to flush unsent
// messages (linger_ms), so process exit never hangs on an unreachable peer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "actors/transport/envelope.h"
#include "actors/transport/keys.h"
#include "common/status.h"

namespace troupe::transport {

// Per-socket options; all fixed at Bind/Connect time.
struct TransportOptions {
  // Max ms the destructor waits to flush unsent messages (ZMQ_LINGER).
  int linger_ms = 200;
  // Max ms Send blocks when the peer's queue is full (ZMQ_SNDTIMEO); then
  // Send returns IOError. -1 blocks forever (not recommended).
  int send_timeout_ms = 5000;
  // Queue limits in messages (ZMQ_SNDHWM / ZMQ_RCVHWM; 0 = unlimited).
  int send_hwm = 1000;
  int receive_hwm = 1000;
  // ZMTP heartbeats (ZMQ_HEARTBEAT_IVL / _TIMEOUT): off by default.
  int heartbeat_ivl_ms = 0;
  int heartbeat_timeout_ms = 0;
  // ZAP domain the server announces (must be non-empty for ZAP to run).
  std::string zap_domain = "troupe";
  // Background I/O threads of the socket's own zmq context.
  int io_threads = 1;
};

// A message received by the server.
struct Incoming {
  std::string peer;             // ZeroMQ routing id: pass it back to Send
  std::string peer_public_key;  // Z85 CURVE key the peer authenticated with
  Frame frame;
};

// A refused connection attempt, as reported by the ZAP handler or monitor.
struct Refusal {
  std::string public_key;  // Z85 client key; empty when the client used no CURVE
  std::string address;     // peer IP (ZAP) or local endpoint (monitor)
  std::string reason;      // "key not in allow-list", "handshake failed: ..."
};

class SecureServer {
 public:
  // Binds a ROUTER socket on `endpoint` ("tcp://127.0.0.1:0" picks a free
  // port; see endpoint()). `server` is this server's key pair; only clients
  // whose public key is in `allowed_client_keys` complete the handshake.
  // InvalidArgument for a bad key or options; IOError if the bind fails.
  static Expected<std::unique_ptr<SecureServer>> Bind(const std::string& endpoint, const KeyPair& server,
                                                      std::vector<std::string> allowed_client_keys,
                                                      TransportOptions options = {});
  ~SecureServer();
  SecureServer(const SecureServer&) = delete;
  SecureServer& operator=(const SecureServer&) = delete;

  // The bound endpoint with the real port ("tcp://127.0.0.1:41234").
  std::string endpoint() const;
  // This server's Z85 public key (what clients pin).
  const std::string& public_key() const;

  // Waits up to timeout_ms (0 = poll, -1 = forever) for the next valid frame.
  // nullopt on timeout. Malformed frames and frames from revoked keys are
  // dropped and counted, and the wait goes on until the deadline.
  // IOError if the socket fails.
  Expected<std::optional<Incoming>> Receive(int timeout_ms);

  // Sends one frame to `peer` (a routing id from Incoming). NotFound if no
  // such peer is connected; IOError on send timeout; InvalidArgument if the
  // payload exceeds kMaxPayloadBytes. The span is copied (see header).
  Status Send(const std::string& peer, uint16_t type, std::span<const uint8_t> payload);
  // Zero-copy variant: takes ownership of `payload`.
  Status Send(const std::string& peer, uint16_t type, std::vector<uint8_t>&& payload);

  // Allow-list edits, any thread. They govern new handshakes at once; frames
  // from an already-connected peer whose key was revoked are dropped by
  // Receive (revoked_drop_count) and Send to it returns InvalidArgument.
  // AllowClient returns InvalidArgument for a malformed key.
  Status AllowClient(const std::string& public_key);
  void RevokeClient(const std::string& public_key);
  std::vector<std::string> allowed_clients() const;  // any thread

  // Counters, any thread.
  uint64_t refused_count() const;                       // ZAP denials + failed handshakes
  uint64_t malformed_count() const;                     // frames dropped by envelope checks
  uint64_t revoked_drop_count() const;                  // frames dropped from revoked keys
  std::optional<std::string> last_refused_key() const;  // Z85, any thread
  // Called on the server's ZAP thread for each refusal (keep it short and
  // thread-safe). Replaces any previous handler; empty to clear. Any thread.
  void SetRefusalHandler(std::function<void(const Refusal&)> handler);

  struct Impl;

 private:
  explicit SecureServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class SecureClient {
 public:
  // Creates a DEALER socket with `client`'s keys, pinned to
  // `server_public_key`, and starts connecting to `endpoint`. Connecting is
  // asynchronous: frames sent before the handshake are queued. Use
  // WaitForHandshake to learn whether the server accepted this key.
  // InvalidArgument for bad keys/options; IOError if connect fails.
  static Expected<std::unique_ptr<SecureClient>> Connect(const std::string& endpoint,
                                                         const std::string& server_public_key, const KeyPair& client,
                                                         TransportOptions options = {});
  ~SecureClient();
  SecureClient(const SecureClient&) = delete;
  SecureClient& operator=(const SecureClient&) = delete;

  // Waits up to timeout_ms for the CURVE/ZAP handshake. OK once it has
  // succeeded (also on later calls); IOError "server refused ..." when the
  // server denied our key or the handshake failed; IOError on timeout.
  // After a ZAP refusal libzmq 4.3 does not retry the handshake: to try
  // again (e.g. once the server has allowed our key), make a new client.
  Status WaitForHandshake(int timeout_ms);

  // Sends one frame. IOError on send timeout (e.g. never connected and the
  // queue is full); InvalidArgument if the payload is over kMaxPayloadBytes.
  Status Send(uint16_t type, std::span<const uint8_t> payload);
  Status Send(uint16_t type, std::vector<uint8_t>&& payload);  // zero-copy

  // Waits up to timeout_ms (0 = poll, -1 = forever) for the next valid
  // frame; nullopt on timeout. Malformed frames are counted and dropped.
  Expected<std::optional<Frame>> Receive(int timeout_ms);

  uint64_t malformed_count() const;
  const std::string& public_key() const;

  struct Impl;

 private:
  explicit SecureClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace troupe::transport
