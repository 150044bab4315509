// SecureServer / SecureClient over the libzmq C API (no exceptions to catch).
#include "actors/transport/socket.h"

#include <spdlog/spdlog.h>
#include <zmq.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

namespace troupe::transport {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kZapEndpoint = "inproc://zeromq.zap.01";
constexpr const char* kMonitorEndpoint = "inproc://troupe.transport.monitor";
constexpr int64_t kMaxMessagePart = static_cast<int64_t>(kMaxPayloadBytes) + kFrameHeaderBytes;
constexpr size_t kMaxPeerKeyEntries = 1 << 16;  // routing id -> key cache bound
// Payloads up to this size travel in one part with their header (one copy,
// one CURVE box); larger ones as a second part (no copy when owned).
constexpr size_t kInlinePayloadBytes = 64 * 1024;

std::string ZmqError(const std::string& what) { return what + ": " + zmq_strerror(zmq_errno()); }

// A zmq_msg_t that closes itself.
struct Msg {
  zmq_msg_t m;
  Msg() { zmq_msg_init(&m); }
  ~Msg() { zmq_msg_close(&m); }
  Msg(const Msg&) = delete;
  Msg& operator=(const Msg&) = delete;
  std::span<const uint8_t> bytes() { return {static_cast<const uint8_t*>(zmq_msg_data(&m)), zmq_msg_size(&m)}; }
  std::string str() { return std::string(static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m)); }
};

// Remaining ms until `deadline` for zmq_poll (-1 = forever).
long RemainingMs(int timeout_ms, Clock::time_point deadline) {
  if (timeout_ms < 0) return -1;
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<long>(left) : 0;
}

Status SetInt(void* s, int option, int value, const char* name) {
  if (zmq_setsockopt(s, option, &value, sizeof(value)) != 0) return Status::InvalidArgument(ZmqError(name));
  return Status::Ok();
}
Status SetStr(void* s, int option, const std::string& value, const char* name) {
  // Z85 keys are passed as 40 chars + NUL, per zmq_setsockopt(3).
  const size_t len = (option == ZMQ_ZAP_DOMAIN) ? value.size() : value.size() + 1;
  if (zmq_setsockopt(s, option, value.c_str(), len) != 0) return Status::InvalidArgument(ZmqError(name));
  return Status::Ok();
}

// Reports `events` of data socket `s` to a new PAIR socket in *monitor (set
// as soon as it exists, so the owner closes it on a later failure).
Status OpenMonitor(void* ctx, void* s, int events, void** monitor) {
  if (zmq_socket_monitor(s, kMonitorEndpoint, events) != 0) {
    return Status::IOError(ZmqError("transport: socket monitor"));
  }
  *monitor = zmq_socket(ctx, ZMQ_PAIR);
  if (!*monitor) return Status::IOError(ZmqError("transport: monitor socket"));
  TROUPE_RETURN_IF_ERROR(SetInt(*monitor, ZMQ_LINGER, 0, "ZMQ_LINGER"));
  if (zmq_connect(*monitor, kMonitorEndpoint) != 0) return Status::IOError(ZmqError("transport: monitor connect"));
  return Status::Ok();
}

// Options common to both ends' data sockets.
Status ApplyCommon(void* s, const TransportOptions& o) {
  TROUPE_RETURN_IF_ERROR(SetInt(s, ZMQ_LINGER, o.linger_ms, "ZMQ_LINGER"));
  TROUPE_RETURN_IF_ERROR(SetInt(s, ZMQ_SNDTIMEO, o.send_timeout_ms, "ZMQ_SNDTIMEO"));
  TROUPE_RETURN_IF_ERROR(SetInt(s, ZMQ_SNDHWM, o.send_hwm, "ZMQ_SNDHWM"));
  TROUPE_RETURN_IF_ERROR(SetInt(s, ZMQ_RCVHWM, o.receive_hwm, "ZMQ_RCVHWM"));
  TROUPE_RETURN_IF_ERROR(SetInt(s, ZMQ_HEARTBEAT_IVL, o.heartbeat_ivl_ms, "ZMQ_HEARTBEAT_IVL"));
  if (o.heartbeat_timeout_ms > 0) {
    TROUPE_RETURN_IF_ERROR(SetInt(s, ZMQ_HEARTBEAT_TIMEOUT, o.heartbeat_timeout_ms, "ZMQ_HEARTBEAT_TIMEOUT"));
  }
  const int64_t max = kMaxMessagePart;
  if (zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max, sizeof(max)) != 0)
    return Status::InvalidArgument(ZmqError("ZMQ_MAXMSGSIZE"));
  return Status::Ok();
}

Status ValidateOptions(const TransportOptions& o) {
  if (o.io_threads < 1) return Status::InvalidArgument("transport: io_threads must be >= 1");
  if (o.linger_ms < 0) return Status::InvalidArgument("transport: linger_ms must be >= 0 (bounded shutdown)");
  if (o.zap_domain.empty())
    return Status::InvalidArgument("transport: zap_domain must be non-empty, else ZAP is skipped");
  return Status::Ok();
}

void* NewContext(int io_threads) {
  void* ctx = zmq_ctx_new();
  if (ctx) zmq_ctx_set(ctx, ZMQ_IO_THREADS, io_threads);
  return ctx;
}

// Reads one monitor event (two parts: 6-byte event+value, endpoint).
bool ReadMonitorEvent(void* mon, uint16_t* event, uint32_t* value, std::string* address) {
  Msg head;
  if (zmq_msg_recv(&head.m, mon, ZMQ_DONTWAIT) < 0) return false;
  if (!zmq_msg_more(&head.m)) return false;
  Msg addr;
  if (zmq_msg_recv(&addr.m, mon, ZMQ_DONTWAIT) < 0) return false;
  if (zmq_msg_size(&head.m) < 6) return false;
  std::memcpy(event, zmq_msg_data(&head.m), 2);
  std::memcpy(value, static_cast<const uint8_t*>(zmq_msg_data(&head.m)) + 2, 4);
  *address = addr.str();
  return true;
}

// Receives the remaining parts of a multipart message (after `first`).
// Returns the number of data parts; parts beyond `max_parts` are discarded.
size_t ReceiveParts(void* s, Msg* parts, size_t max_parts) {
  size_t n = 0;
  int more = 1;
  while (more) {
    if (n < max_parts) {
      if (zmq_msg_recv(&parts[n].m, s, 0) < 0) return n;
      more = zmq_msg_more(&parts[n].m);
    } else {
      Msg extra;
      if (zmq_msg_recv(&extra.m, s, 0) < 0) return n;
      more = zmq_msg_more(&extra.m);
    }
    ++n;
  }
  return n;
}

// Decodes 1 part (whole frame) or 2 parts (header, payload).
Expected<Frame> DecodeParts(Msg* parts, size_t n) {
  if (n == 1) return DecodeFrame(parts[0].bytes());
  if (n == 2) return DecodeFrameParts(parts[0].bytes(), parts[1].bytes());
  return Status::Corruption("frame: " + std::to_string(n) + " message parts, expected 1 or 2");
}

// Receives the first part of a message, waiting up to `wait_ms` (-1 =
// forever). A blocking receive with ZMQ_RCVTIMEO costs fewer system calls
// than poll-then-receive (measurable on loopback round trips). `cached` is
// the socket's current ZMQ_RCVTIMEO, to set it only when it changes.
int RecvWithin(void* s, zmq_msg_t* m, long wait_ms, int* cached) {
  const int want = static_cast<int>(wait_ms);
  if (want != *cached && zmq_setsockopt(s, ZMQ_RCVTIMEO, &want, sizeof(want)) == 0) *cached = want;
  return zmq_msg_recv(m, s, want == 0 ? ZMQ_DONTWAIT : 0);
}

// Names a failed-handshake monitor event for logs and errors.
std::string HandshakeFailure(uint16_t event, uint32_t value) {
  char buf[128];
  if (event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) {
    std::snprintf(buf, sizeof(buf), "handshake failed: %s", std::strerror(static_cast<int>(value)));
    return buf;
  }
  const char* what = "protocol error";
  if (value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) what = "mechanism mismatch (peer does not use CURVE?)";
  if (value == ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC) what = "cryptographic error (client pinned another server key?)";
  std::snprintf(buf, sizeof(buf), "handshake failed: %s (0x%08X)", what, value);
  return buf;
}

void FreeVector(void* /*data*/, void* hint) { delete static_cast<std::vector<uint8_t>*>(hint); }

// A frame ready to send: one part (header + payload, for small payloads,
// so CURVE encrypts one box instead of two) or two parts (header, payload;
// the payload adopted without a copy when owned).
struct PreparedFrame {
  zmq_msg_t parts[2];
  int n = 0;
  PreparedFrame() = default;
  PreparedFrame(const PreparedFrame&) = delete;
  PreparedFrame& operator=(const PreparedFrame&) = delete;
  ~PreparedFrame() {
    for (int i = 0; i < n; ++i) zmq_msg_close(&parts[i]);
  }
};

Status PrepareFrame(uint16_t type, std::span<const uint8_t> payload, std::vector<uint8_t>* owned, PreparedFrame* out) {
  if (payload.size() > kMaxPayloadBytes) {
    return Status::InvalidArgument("transport: payload of " + std::to_string(payload.size()) + " bytes exceeds max " +
                                   std::to_string(kMaxPayloadBytes));
  }
  const auto header = EncodeFrameHeader(type, payload);
  if (payload.size() <= kInlinePayloadBytes) {
    if (zmq_msg_init_size(&out->parts[0], kFrameHeaderBytes + payload.size()) != 0) {
      return Status::OutOfMemory(ZmqError("transport: zmq_msg_init_size"));
    }
    out->n = 1;
    auto* p = static_cast<uint8_t*>(zmq_msg_data(&out->parts[0]));
    std::memcpy(p, header.data(), kFrameHeaderBytes);
    if (!payload.empty()) std::memcpy(p + kFrameHeaderBytes, payload.data(), payload.size());
    return Status::Ok();
  }
  if (zmq_msg_init_size(&out->parts[0], kFrameHeaderBytes) != 0) {
    return Status::OutOfMemory(ZmqError("transport: zmq_msg_init_size"));
  }
  out->n = 1;
  std::memcpy(zmq_msg_data(&out->parts[0]), header.data(), kFrameHeaderBytes);
  if (owned) {
    auto* heap = new std::vector<uint8_t>(std::move(*owned));
    if (zmq_msg_init_data(&out->parts[1], heap->data(), heap->size(), FreeVector, heap) != 0) {
      delete heap;
      return Status::OutOfMemory(ZmqError("transport: zmq_msg_init_data"));
    }
  } else {
    if (zmq_msg_init_size(&out->parts[1], payload.size()) != 0) {
      return Status::OutOfMemory(ZmqError("transport: zmq_msg_init_size"));
    }
    std::memcpy(zmq_msg_data(&out->parts[1]), payload.data(), payload.size());
  }
  out->n = 2;
  return Status::Ok();
}

// Sends the prepared parts (after a routing id, on the server).
Status SendPrepared(void* s, PreparedFrame* f) {
  for (int i = 0; i < f->n; ++i) {
    if (zmq_msg_send(&f->parts[i], s, i + 1 < f->n ? ZMQ_SNDMORE : 0) < 0) {
      const int err = zmq_errno();
      if (err == EAGAIN) return Status::IOError("transport: send timed out (queue full)");
      return Status::IOError(std::string("transport: send: ") + zmq_strerror(err));
    }
    zmq_msg_init(&f->parts[i]);  // sent messages are empty; keep the close in ~PreparedFrame valid
  }
  return Status::Ok();
}

}  // namespace

// ============================== SecureServer ===============================

struct SecureServer::Impl {
  TransportOptions options;
  std::string endpoint;
  std::string public_key;
  void* ctx = nullptr;
  void* router = nullptr;   // owner thread
  void* zap = nullptr;      // ZAP thread
  void* monitor = nullptr;  // ZAP thread
  std::thread zap_thread;

  mutable std::mutex mu;  // guards allowed, last_refused, handler
  std::set<std::string> allowed;
  std::optional<std::string> last_refused;
  std::function<void(const Refusal&)> handler;

  std::atomic<uint64_t> refused{0};
  std::atomic<uint64_t> malformed{0};
  std::atomic<uint64_t> revoked_drops{0};

  std::unordered_map<std::string, std::string> peer_keys;  // owner thread
  int rcvtimeo = -1;                                       // owner thread

  bool IsAllowed(const std::string& key) const {
    std::lock_guard<std::mutex> lock(mu);
    return allowed.count(key) != 0;
  }

  void Refuse(Refusal r) {
    const uint64_t n = ++refused;
    std::function<void(const Refusal&)> h;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!r.public_key.empty()) last_refused = r.public_key;
      h = handler;
    }
    // Refused clients retry every reconnect interval: log the first few,
    // then powers of two, so a stray client cannot flood the log.
    if (n <= 8 || (n & (n - 1)) == 0) {
      spdlog::warn("transport: {} refused connection from {} key '{}': {} ({} refusals so far)", endpoint, r.address,
                   r.public_key.empty() ? "<none>" : r.public_key, r.reason, n);
    }
    if (h) h(r);
  }

  // One ZAP request (RFC 27): version, request id, domain, address,
  // routing id, mechanism, credentials...; reply with 200 or 400.
  void ServeZap() {
    Msg parts[8];
    const size_t n = ReceiveParts(zap, parts, 8);
    if (n == 0) return;
    std::string request_id = n > 1 ? parts[1].str() : "";
    std::string code = "400", text = "malformed ZAP request", user_id;
    if (n >= 6 && parts[0].str() == "1.0") {
      const std::string address = parts[3].str();
      const std::string mechanism = parts[5].str();
      if (mechanism == "CURVE" && n >= 7 && zmq_msg_size(&parts[6].m) == 32) {
        char z85[kZ85KeyChars + 1] = {};
        zmq_z85_encode(z85, static_cast<const uint8_t*>(zmq_msg_data(&parts[6].m)), 32);
        const std::string key = z85;
        if (IsAllowed(key)) {
          code = "200";
          text = "OK";
          user_id = key;
        } else {
          text = "key not in allow-list";
          Refuse({key, address, text});
        }
      } else {
        text = "mechanism " + mechanism + " not allowed";
        Refuse({"", address, text});
      }
    }
    const std::string reply[6] = {"1.0", request_id, code, text, user_id, ""};
    for (int i = 0; i < 6; ++i) zmq_send(zap, reply[i].data(), reply[i].size(), i < 5 ? ZMQ_SNDMORE : 0);
  }

  // Handshake failures that never reach ZAP (e.g. a client without CURVE).
  void ServeMonitor() {
    uint16_t event = 0;
    uint32_t value = 0;
    std::string address;
    while (ReadMonitorEvent(monitor, &event, &value, &address)) {
      if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL || event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) {
        Refuse({"", address, HandshakeFailure(event, value)});
      }
    }
  }

  // The ZAP thread: serves ZAP and monitor events until the context ends.
  void ZapLoop() {
    zmq_pollitem_t items[2] = {{zap, 0, ZMQ_POLLIN, 0}, {monitor, 0, ZMQ_POLLIN, 0}};
    while (true) {
      if (zmq_poll(items, 2, -1) < 0) {
        if (zmq_errno() == EINTR) continue;
        break;  // ETERM: the server is shutting down
      }
      if (items[0].revents & ZMQ_POLLIN) ServeZap();
      if (items[1].revents & ZMQ_POLLIN) ServeMonitor();
    }
    zmq_close(zap);
    zmq_close(monitor);
  }

  ~Impl() {
    if (router) zmq_close(router);
    if (ctx) {
      zmq_ctx_shutdown(ctx);  // wakes the ZAP thread with ETERM
      if (zap_thread.joinable()) {
        zap_thread.join();
      } else {
        if (zap) zmq_close(zap);
        if (monitor) zmq_close(monitor);
      }
      zmq_ctx_term(ctx);  // bounded by ZMQ_LINGER
    }
  }
};

SecureServer::SecureServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SecureServer::~SecureServer() = default;

Expected<std::unique_ptr<SecureServer>> SecureServer::Bind(const std::string& endpoint, const KeyPair& server,
                                                           std::vector<std::string> allowed_client_keys,
                                                           TransportOptions options) {
  TROUPE_RETURN_IF_ERROR(ValidateOptions(options));
  TROUPE_RETURN_IF_ERROR(ValidateKeyPair(server).WithContext("transport: server key pair"));
  for (const auto& k : allowed_client_keys) {
    TROUPE_RETURN_IF_ERROR(ValidateKey(k, "allowed client key").WithContext("transport"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->public_key = server.public_key;
  impl->allowed.insert(allowed_client_keys.begin(), allowed_client_keys.end());

  impl->ctx = NewContext(options.io_threads);
  if (!impl->ctx) return Status::IOError(ZmqError("transport: zmq_ctx_new"));
  // The ZAP handler must be bound before the first handshake can start.
  impl->zap = zmq_socket(impl->ctx, ZMQ_REP);
  if (!impl->zap) return Status::IOError(ZmqError("transport: ZAP socket"));
  TROUPE_RETURN_IF_ERROR(SetInt(impl->zap, ZMQ_LINGER, 0, "ZMQ_LINGER"));
  if (zmq_bind(impl->zap, kZapEndpoint) != 0) return Status::IOError(ZmqError("transport: bind ZAP handler"));

  void* r = impl->router = zmq_socket(impl->ctx, ZMQ_ROUTER);
  if (!r) return Status::IOError(ZmqError("transport: ROUTER socket"));
  TROUPE_RETURN_IF_ERROR(ApplyCommon(r, options));
  TROUPE_RETURN_IF_ERROR(SetInt(r, ZMQ_ROUTER_MANDATORY, 1, "ZMQ_ROUTER_MANDATORY"));
  TROUPE_RETURN_IF_ERROR(SetInt(r, ZMQ_CURVE_SERVER, 1, "ZMQ_CURVE_SERVER"));
  TROUPE_RETURN_IF_ERROR(SetStr(r, ZMQ_CURVE_SECRETKEY, server.secret_key, "ZMQ_CURVE_SECRETKEY"));
  TROUPE_RETURN_IF_ERROR(SetStr(r, ZMQ_ZAP_DOMAIN, options.zap_domain, "ZMQ_ZAP_DOMAIN"));

  TROUPE_RETURN_IF_ERROR(OpenMonitor(impl->ctx, r,
                                     ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                                     &impl->monitor));

  if (zmq_bind(r, endpoint.c_str()) != 0) return Status::IOError(ZmqError("transport: bind " + endpoint));
  char last[256] = {};
  size_t last_len = sizeof(last);
  if (zmq_getsockopt(r, ZMQ_LAST_ENDPOINT, last, &last_len) != 0) {
    return Status::IOError(ZmqError("transport: ZMQ_LAST_ENDPOINT"));
  }
  impl->endpoint = last;
  Impl* raw = impl.get();
  impl->zap_thread = std::thread([raw] { raw->ZapLoop(); });
  return std::unique_ptr<SecureServer>(new SecureServer(std::move(impl)));
}

std::string SecureServer::endpoint() const { return impl_->endpoint; }
const std::string& SecureServer::public_key() const { return impl_->public_key; }

Expected<std::optional<Incoming>> SecureServer::Receive(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  while (true) {
    Msg id;
    if (RecvWithin(impl_->router, &id.m, RemainingMs(timeout_ms, deadline), &impl_->rcvtimeo) < 0) {
      if (zmq_errno() == EINTR) continue;
      if (zmq_errno() == EAGAIN) return std::optional<Incoming>();
      return Status::IOError(ZmqError("transport: receive"));
    }
    Msg parts[2];
    const size_t n = zmq_msg_more(&id.m) ? ReceiveParts(impl_->router, parts, 2) : 0;
    const char* uid = n > 0 ? zmq_msg_gets(&parts[0].m, "User-Id") : nullptr;
    const std::string key = uid ? uid : "";
    if (!impl_->IsAllowed(key)) {
      ++impl_->revoked_drops;
      continue;
    }
    auto frame = DecodeParts(parts, n);
    if (!frame.ok()) {
      const uint64_t m = ++impl_->malformed;
      if (m <= 8 || (m & (m - 1)) == 0) {
        spdlog::warn("transport: dropped malformed frame from key '{}': {} ({} so far)", key, frame.status().message(),
                     m);
      }
      continue;
    }
    Incoming in{id.str(), key, std::move(frame).value()};
    if (impl_->peer_keys.size() >= kMaxPeerKeyEntries) impl_->peer_keys.clear();
    impl_->peer_keys[in.peer] = key;
    return std::optional<Incoming>(std::move(in));
  }
}

namespace {
Status ServerSend(SecureServer::Impl* impl, const std::string& peer, uint16_t type, std::span<const uint8_t> payload,
                  std::vector<uint8_t>* owned) {
  if (auto it = impl->peer_keys.find(peer); it != impl->peer_keys.end() && !impl->IsAllowed(it->second)) {
    return Status::InvalidArgument("transport: peer's key " + it->second + " was revoked");
  }
  PreparedFrame frame;
  TROUPE_RETURN_IF_ERROR(PrepareFrame(type, payload, owned, &frame));
  if (zmq_send(impl->router, peer.data(), peer.size(), ZMQ_SNDMORE) < 0) {
    const int err = zmq_errno();
    if (err == EHOSTUNREACH) return Status::NotFound("transport: no connected peer with this routing id");
    if (err == EAGAIN) return Status::IOError("transport: send timed out (peer queue full)");
    return Status::IOError(std::string("transport: send: ") + zmq_strerror(err));
  }
  return SendPrepared(impl->router, &frame);
}
}  // namespace

Status SecureServer::Send(const std::string& peer, uint16_t type, std::span<const uint8_t> payload) {
  return ServerSend(impl_.get(), peer, type, payload, nullptr);
}
Status SecureServer::Send(const std::string& peer, uint16_t type, std::vector<uint8_t>&& payload) {
  return ServerSend(impl_.get(), peer, type, payload, &payload);
}

Status SecureServer::AllowClient(const std::string& public_key) {
  TROUPE_RETURN_IF_ERROR(ValidateKey(public_key, "client public key").WithContext("transport: AllowClient"));
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->allowed.insert(public_key);
  return Status::Ok();
}
void SecureServer::RevokeClient(const std::string& public_key) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->allowed.erase(public_key);
}
std::vector<std::string> SecureServer::allowed_clients() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return {impl_->allowed.begin(), impl_->allowed.end()};
}
uint64_t SecureServer::refused_count() const { return impl_->refused.load(); }
uint64_t SecureServer::malformed_count() const { return impl_->malformed.load(); }
uint64_t SecureServer::revoked_drop_count() const { return impl_->revoked_drops.load(); }
std::optional<std::string> SecureServer::last_refused_key() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->last_refused;
}
void SecureServer::SetRefusalHandler(std::function<void(const Refusal&)> handler) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->handler = std::move(handler);
}

// ============================== SecureClient ===============================

struct SecureClient::Impl {
  std::string public_key;
  void* ctx = nullptr;
  void* dealer = nullptr;
  void* monitor = nullptr;
  bool handshake_ok = false;
  Status handshake_error;  // set once the server refused us
  std::atomic<uint64_t> malformed{0};
  int rcvtimeo = -1;  // current ZMQ_RCVTIMEO of dealer

  // Applies pending monitor events to the handshake state.
  void DrainMonitor() {
    uint16_t event = 0;
    uint32_t value = 0;
    std::string address;
    while (ReadMonitorEvent(monitor, &event, &value, &address)) {
      if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        handshake_ok = true;
        handshake_error = Status::Ok();
      } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        handshake_error = Status::IOError("transport: server " + address + " refused our key (ZAP status " +
                                          std::to_string(value) + ")");
      } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL || event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) {
        handshake_error =
            Status::IOError("transport: server " + address + " refused us: " + HandshakeFailure(event, value));
      }
    }
  }

  ~Impl() {
    if (monitor) zmq_close(monitor);
    if (dealer) zmq_close(dealer);
    if (ctx) zmq_ctx_term(ctx);  // bounded by ZMQ_LINGER
  }
};

SecureClient::SecureClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SecureClient::~SecureClient() = default;

Expected<std::unique_ptr<SecureClient>> SecureClient::Connect(const std::string& endpoint,
                                                              const std::string& server_public_key,
                                                              const KeyPair& client, TransportOptions options) {
  TROUPE_RETURN_IF_ERROR(ValidateOptions(options));
  TROUPE_RETURN_IF_ERROR(ValidateKeyPair(client).WithContext("transport: client key pair"));
  TROUPE_RETURN_IF_ERROR(ValidateKey(server_public_key, "server public key").WithContext("transport"));
  auto impl = std::make_unique<Impl>();
  impl->public_key = client.public_key;
  impl->ctx = NewContext(options.io_threads);
  if (!impl->ctx) return Status::IOError(ZmqError("transport: zmq_ctx_new"));
  void* d = impl->dealer = zmq_socket(impl->ctx, ZMQ_DEALER);
  if (!d) return Status::IOError(ZmqError("transport: DEALER socket"));
  TROUPE_RETURN_IF_ERROR(ApplyCommon(d, options));
  TROUPE_RETURN_IF_ERROR(SetStr(d, ZMQ_CURVE_SERVERKEY, server_public_key, "ZMQ_CURVE_SERVERKEY"));
  TROUPE_RETURN_IF_ERROR(SetStr(d, ZMQ_CURVE_PUBLICKEY, client.public_key, "ZMQ_CURVE_PUBLICKEY"));
  TROUPE_RETURN_IF_ERROR(SetStr(d, ZMQ_CURVE_SECRETKEY, client.secret_key, "ZMQ_CURVE_SECRETKEY"));
  TROUPE_RETURN_IF_ERROR(OpenMonitor(impl->ctx, d,
                                     ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                                         ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                                     &impl->monitor));
  if (zmq_connect(d, endpoint.c_str()) != 0) return Status::IOError(ZmqError("transport: connect " + endpoint));
  return std::unique_ptr<SecureClient>(new SecureClient(std::move(impl)));
}

Status SecureClient::WaitForHandshake(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  zmq_pollitem_t item = {impl_->monitor, 0, ZMQ_POLLIN, 0};
  while (true) {
    impl_->DrainMonitor();
    if (impl_->handshake_ok) return Status::Ok();
    if (!impl_->handshake_error.ok()) {
      return impl_->handshake_error;
    }
    const long left = RemainingMs(timeout_ms, deadline);
    if (left == 0)
      return Status::IOError("transport: no handshake with the server within " + std::to_string(timeout_ms) + " ms");
    if (zmq_poll(&item, 1, left) < 0 && zmq_errno() != EINTR) return Status::IOError(ZmqError("transport: poll"));
  }
}

namespace {
Status ClientSend(void* dealer, uint16_t type, std::span<const uint8_t> payload, std::vector<uint8_t>* owned) {
  PreparedFrame frame;
  TROUPE_RETURN_IF_ERROR(PrepareFrame(type, payload, owned, &frame));
  return SendPrepared(dealer, &frame);
}
}  // namespace

Status SecureClient::Send(uint16_t type, std::span<const uint8_t> payload) {
  return ClientSend(impl_->dealer, type, payload, nullptr);
}
Status SecureClient::Send(uint16_t type, std::vector<uint8_t>&& payload) {
  return ClientSend(impl_->dealer, type, payload, &payload);
}

Expected<std::optional<Frame>> SecureClient::Receive(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  while (true) {
    Msg parts[2];
    if (RecvWithin(impl_->dealer, &parts[0].m, RemainingMs(timeout_ms, deadline), &impl_->rcvtimeo) < 0) {
      if (zmq_errno() == EINTR) continue;
      if (zmq_errno() == EAGAIN) return std::optional<Frame>();
      return Status::IOError(ZmqError("transport: receive"));
    }
    size_t n = 1;
    if (zmq_msg_more(&parts[0].m)) n += ReceiveParts(impl_->dealer, parts + 1, 1);
    auto frame = DecodeParts(parts, n);
    if (!frame.ok()) {
      ++impl_->malformed;
      continue;
    }
    return std::optional<Frame>(std::move(frame).value());
  }
}

uint64_t SecureClient::malformed_count() const { return impl_->malformed.load(); }
const std::string& SecureClient::public_key() const { return impl_->public_key; }

}  // namespace troupe::transport
