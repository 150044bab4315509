// Message-type numbering and the transport's own small protocol messages.
//
//   type range     owner
//   0              invalid (never sent)
//   1 .. 255       transport (this file)
//   256 .. 65535   cluster layer (coordinator/node protocol), from kUserBase
//
// Every payload is a codec.h blob of the struct named next to its type.
#pragma once

#include <cereal/types/string.hpp>
#include <cstdint>
#include <string>

namespace troupe::transport {

enum class MessageType : uint16_t {
  kInvalid = 0,
  kHello = 1,      // Hello: first frame a client sends
  kWelcome = 2,    // Welcome: the server's answer to Hello
  kHeartbeat = 3,  // Heartbeat: liveness ping/pong (the cluster layer's clock)
  kError = 4,      // ErrorReply: a request failed
  kGoodbye = 5,    // Goodbye: orderly disconnect
  kUserBase = 256,
};

inline constexpr uint16_t ToWire(MessageType t) { return static_cast<uint16_t>(t); }

struct Hello {
  uint16_t protocol_version = 1;
  std::string node_name;  // human-readable, e.g. "node-3"
  std::string build_id;   // git hash of the sender's binary
  uint64_t pid = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(protocol_version, node_name, build_id, pid);
  }
};

struct Welcome {
  uint16_t protocol_version = 1;
  std::string session_id;     // chosen by the server for this connection
  uint32_t heartbeat_ms = 0;  // period the server expects heartbeats at
  template <class Archive>
  void serialize(Archive& ar) {
    ar(protocol_version, session_id, heartbeat_ms);
  }
};

struct Heartbeat {
  uint64_t sequence = 0;
  int64_t sent_unix_ns = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(sequence, sent_unix_ns);
  }
};

struct ErrorReply {
  int32_t code = 0;  // a troupe::StatusCode value
  std::string message;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(code, message);
  }
};

struct Goodbye {
  std::string reason;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(reason);
  }
};

}  // namespace troupe::transport
