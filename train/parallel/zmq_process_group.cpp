// The ZeroMQ process group: one process per rank, every connection CURVE-authenticated.
//
// Threads (a SecureServer / SecureClient is not thread-safe, so each has exactly one owner):
//   receive thread  creates the server, admits the other ranks' keys, polls it, delivers into the mailbox,
//                   destroys it
//   send thread     creates one client per peer, waits for their handshakes, drains the send queue, destroys them
//   callers         Send (queue), Recv (mailbox), Abort, stats
//
// Wire: one envelope frame of type kProcessGroupFrame per message; its payload is the message bytes followed by a
// 16-byte trailer (little-endian):
//
//   offset      size  field
//   len         4     magic   kTrailerMagic ('TPG1')
//   len + 4     4     sender  rank of the sender (checked against the connection's authenticated key)
//   len + 8     8     tag
//
// A trailer rather than a header: Send appends it in place (no copy when the caller reserved kSendReserveBytes)
// and the receiver strips it with a resize, so the payload is never moved to make room.
//
// Bootstrap (CreateZmqGroup), all within connect_timeout_ms:
//   bind server ─▶ publish address ─▶ wait for all ─▶ admit their keys ─▶ mark ready ─▶ wait all ready
//   ─▶ connect clients + handshakes ─▶ hello to every peer ─▶ hello from every peer
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <future>
#include <thread>
#include <unordered_map>

#include "actors/transport/envelope.h"
#include "actors/transport/socket.h"
#include "common/little_endian.h"
#include "train/parallel/process_group.h"

namespace troupe::parallel {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint16_t kProcessGroupFrame = 1024;   // envelope type; these sockets carry nothing else
constexpr uint32_t kTrailerMagic = 0x31475054;  // 'TPG1'
constexpr size_t kTrailerBytes = 16;
static_assert(kTrailerBytes == kSendReserveBytes);
constexpr int kReceivePollMs = 20;  // how often the receive thread checks for shutdown
// Sockets: a rank's last messages must get out when it exits right after a collective, but an exit must not hang
// long on a dead peer.
constexpr int kLingerMs = 1000;

int RemainingMs(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

uint64_t ThreadCpuNs() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

std::string Join(const std::vector<std::string>& parts) {
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : "; ") + p;
  return out;
}

class ZmqGroup final : public ProcessGroup {
 public:
  ZmqGroup(int rank, int size, transport::KeyPair self) : rank_(rank), size_(size), self_(std::move(self)) {}
  ~ZmqGroup() override { Shutdown(); }

  Status Start(const std::string& bind_endpoint, Rendezvous& rendezvous, int timeout_ms);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Status Send(int peer, uint64_t tag, std::vector<uint8_t> bytes) override;
  Expected<std::vector<uint8_t>> Recv(int peer, uint64_t tag, int timeout_ms) override;
  void Abort(const std::string& why) override;
  CommStats stats() const override;

 private:
  struct Outgoing {
    int peer;
    std::vector<uint8_t> frame;  // payload + trailer
  };

  Status Enqueue(int peer, uint64_t tag, std::vector<uint8_t> bytes);
  void ReceiveLoop(std::string bind_endpoint);
  void HandleFrame(transport::Incoming in);
  void SendLoop(Clock::time_point deadline);
  Status ConnectAll(Clock::time_point deadline, std::vector<std::unique_ptr<transport::SecureClient>>* clients);
  void Shutdown();

  const int rank_;
  const int size_;
  const transport::KeyPair self_;
  std::vector<PeerAddress> peers_;                    // by rank; set before the threads read it
  std::unordered_map<std::string, int> rank_of_key_;  // the same
  Mailbox mailbox_;

  // Bootstrap hand-offs between Start and the two threads.
  std::promise<Expected<std::string>> bound_;                    // receive thread: endpoint or error
  std::promise<std::optional<std::vector<std::string>>> admit_;  // Start: keys to admit; nullopt = give up
  bool admit_set_ = false;
  std::promise<Status> admitted_;   // receive thread
  std::promise<Status> connected_;  // send thread

  std::mutex send_mu_;  // guards queue_, stopping_
  std::condition_variable send_cv_;
  std::deque<Outgoing> queue_;
  bool stopping_ = false;
  std::atomic<bool> stop_receiving_{false};
  std::thread send_thread_, recv_thread_;

  std::atomic<uint64_t> messages_sent_{0}, bytes_sent_{0}, messages_received_{0}, bytes_received_{0};
  std::atomic<uint64_t> dropped_{0}, server_malformed_{0}, send_cpu_ns_{0}, recv_cpu_ns_{0};
  mutable std::mutex wait_mu_;
  double recv_wait_s_ = 0;
};

Status ZmqGroup::Start(const std::string& bind_endpoint, Rendezvous& rendezvous, int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  const std::string me = "process group rank " + std::to_string(rank_);
  if (size_ == 1) return Status::Ok();  // every message is a self-send

  auto bound_future = bound_.get_future();
  recv_thread_ = std::thread(&ZmqGroup::ReceiveLoop, this, bind_endpoint);
  Expected<std::string> endpoint = bound_future.get();  // Bind does not block on peers
  if (!endpoint.ok()) return endpoint.status().WithContext(me + ": bind " + bind_endpoint);

  TROUPE_RETURN_IF_ERROR(rendezvous.Publish(rank_, {endpoint.value(), self_.public_key}).WithContext(me));
  auto all = rendezvous.WaitForAll(size_, RemainingMs(deadline));
  if (!all.ok()) return all.status().WithContext(me);
  peers_ = std::move(all).value();
  if (peers_.size() != static_cast<size_t>(size_)) {
    return Status::Internal(me + ": rendezvous returned " + std::to_string(peers_.size()) + " addresses");
  }
  if (peers_[static_cast<size_t>(rank_)].public_key != self_.public_key) {
    return Status::InvalidArgument(me + ": the rendezvous holds another key for this rank (stale directory?)");
  }
  std::vector<std::string> others;
  for (int r = 0; r < size_; ++r) {
    const std::string& key = peers_[static_cast<size_t>(r)].public_key;
    auto [it, fresh] = rank_of_key_.emplace(key, r);
    if (!fresh) {
      return Status::InvalidArgument(me + ": ranks " + std::to_string(it->second) + " and " + std::to_string(r) +
                                     " published the same public key; each rank needs its own key pair");
    }
    if (r != rank_) others.push_back(key);
  }

  auto admitted_future = admitted_.get_future();
  admit_.set_value(std::move(others));
  admit_set_ = true;
  TROUPE_RETURN_IF_ERROR(admitted_future.get().WithContext(me));
  TROUPE_RETURN_IF_ERROR(rendezvous.MarkReady(rank_).WithContext(me));
  TROUPE_RETURN_IF_ERROR(rendezvous.WaitAllReady(size_, RemainingMs(deadline)).WithContext(me));

  // Every rank is ready: connecting gets a timeout of its own, whatever the
  // rendezvous took (a rendezvous may wait on late ranks as long as it likes).
  const auto connect_deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  auto connected_future = connected_.get_future();
  send_thread_ = std::thread(&ZmqGroup::SendLoop, this, connect_deadline);
  TROUPE_RETURN_IF_ERROR(connected_future.get().WithContext(me));

  // Our handshakes only prove our clients got in; a hello from each peer proves theirs did too, i.e. that every
  // rank completed its bootstrap.
  for (int p = 0; p < size_; ++p) {
    if (p != rank_) TROUPE_RETURN_IF_ERROR(Enqueue(p, kReservedTag, {}));
  }
  std::vector<std::string> silent;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    if (!mailbox_.Take(rank_, p, kReservedTag, RemainingMs(connect_deadline), nullptr).ok())
      silent.push_back(std::to_string(p));
  }
  if (!silent.empty()) {
    std::string list;
    for (const auto& s : silent) list += (list.empty() ? "" : ", ") + s;
    return Status::IOError(me + ": no hello from ranks " + list + " within " + std::to_string(timeout_ms) +
                           " ms (they could not connect to this rank, or failed their own bootstrap)");
  }
  return Status::Ok();
}

void ZmqGroup::ReceiveLoop(std::string bind_endpoint) {
  transport::TransportOptions options;
  options.linger_ms = kLingerMs;
  auto server = transport::SecureServer::Bind(bind_endpoint, self_, {}, options);
  if (!server.ok()) {
    bound_.set_value(server.status());
    return;
  }
  bound_.set_value(server.value()->endpoint());
  const std::optional<std::vector<std::string>> keys = admit_.get_future().get();
  if (!keys) return;  // bootstrap failed before the allow-list was known
  Status admitted;
  for (const auto& k : *keys) {
    admitted = server.value()->AllowClient(k);
    if (!admitted.ok()) break;
  }
  admitted_.set_value(admitted);
  if (!admitted.ok()) return;

  while (!stop_receiving_.load()) {
    auto in = server.value()->Receive(kReceivePollMs);
    server_malformed_.store(server.value()->malformed_count());
    if (!in.ok()) {
      Abort("receive failed: " + in.status().message());
      break;
    }
    if (in.value()) HandleFrame(std::move(*in.value()));
    recv_cpu_ns_.store(ThreadCpuNs());
  }
}

void ZmqGroup::HandleFrame(transport::Incoming in) {
  // Frames are dropped, never returned: a bad frame is the sender's bug or an attack, not this receiver's error.
  auto drop = [&](const std::string& why) {
    const uint64_t n = ++dropped_;
    if (n <= 8 || (n & (n - 1)) == 0) {
      spdlog::warn("process group rank {}: dropped a frame from key {}: {} ({} so far)", rank_, in.peer_public_key, why,
                   n);
    }
  };
  const std::vector<uint8_t>& p = in.frame.payload;
  if (in.frame.type != kProcessGroupFrame) return drop("envelope type " + std::to_string(in.frame.type));
  if (p.size() < kTrailerBytes) return drop("payload shorter than the trailer");
  const uint8_t* t = p.data() + p.size() - kTrailerBytes;
  if (GetLe(t, 4) != kTrailerMagic) return drop("bad trailer magic");
  const uint64_t sender = GetLe(t + 4, 4);
  const uint64_t tag = GetLe(t + 8, 8);
  auto owner = rank_of_key_.find(in.peer_public_key);
  if (owner == rank_of_key_.end() || static_cast<uint64_t>(owner->second) != sender) {
    return drop("claims to come from rank " + std::to_string(sender) + " but authenticated as rank " +
                (owner == rank_of_key_.end() ? std::string("<unknown>") : std::to_string(owner->second)));
  }
  std::vector<uint8_t> bytes = std::move(in.frame.payload);
  bytes.resize(bytes.size() - kTrailerBytes);
  messages_received_.fetch_add(1);
  bytes_received_.fetch_add(bytes.size());
  mailbox_.Deliver(static_cast<int>(sender), tag, std::move(bytes));
}

Status ZmqGroup::ConnectAll(Clock::time_point deadline,
                            std::vector<std::unique_ptr<transport::SecureClient>>* clients) {
  transport::TransportOptions options;
  options.linger_ms = kLingerMs;
  std::vector<std::string> failures;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const PeerAddress& a = peers_[static_cast<size_t>(p)];
    auto c = transport::SecureClient::Connect(a.endpoint, a.public_key, self_, options);
    if (!c.ok()) {
      failures.push_back("rank " + std::to_string(p) + " (" + a.endpoint + "): " + c.status().message());
      continue;
    }
    (*clients)[static_cast<size_t>(p)] = std::move(c).value();
  }
  // Handshakes run in parallel on the clients' I/O threads; wait for each in turn.
  for (int p = 0; p < size_; ++p) {
    auto& c = (*clients)[static_cast<size_t>(p)];
    if (!c) continue;
    const Status s = c->WaitForHandshake(RemainingMs(deadline));
    if (!s.ok()) {
      failures.push_back("rank " + std::to_string(p) + " (" + peers_[static_cast<size_t>(p)].endpoint +
                         "): " + s.message());
    }
  }
  if (failures.empty()) return Status::Ok();
  return Status::IOError("cannot connect: " + Join(failures));
}

void ZmqGroup::SendLoop(Clock::time_point deadline) {
  std::vector<std::unique_ptr<transport::SecureClient>> clients(static_cast<size_t>(size_));
  const Status connected = ConnectAll(deadline, &clients);
  connected_.set_value(connected);
  if (!connected.ok()) return;
  while (true) {
    Outgoing out;
    {
      std::unique_lock<std::mutex> lock(send_mu_);
      send_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) break;  // stopping, and everything queued went out first
      out = std::move(queue_.front());
      queue_.pop_front();
    }
    const Status s = clients[static_cast<size_t>(out.peer)]->Send(kProcessGroupFrame, std::move(out.frame));
    send_cpu_ns_.store(ThreadCpuNs());
    if (!s.ok()) Abort("send to rank " + std::to_string(out.peer) + " failed: " + s.message());
  }
}  // the clients' destructors flush what libzmq still holds, for up to kLingerMs

Status ZmqGroup::Enqueue(int peer, uint64_t tag, std::vector<uint8_t> bytes) {
  const uint64_t n = bytes.size();
  if (peer == rank_) {
    mailbox_.Deliver(rank_, tag, std::move(bytes));
    messages_received_.fetch_add(1);
    bytes_received_.fetch_add(n);
  } else {
    uint8_t trailer[kTrailerBytes];
    PutLe(trailer, kTrailerMagic, 4);
    PutLe(trailer + 4, static_cast<uint64_t>(rank_), 4);
    PutLe(trailer + 8, tag, 8);
    bytes.insert(bytes.end(), trailer, trailer + kTrailerBytes);
    {
      std::lock_guard<std::mutex> lock(send_mu_);
      if (stopping_) return Status::IOError("process group rank " + std::to_string(rank_) + " is shutting down");
      queue_.push_back({peer, std::move(bytes)});
    }
    send_cv_.notify_one();
  }
  messages_sent_.fetch_add(1);
  bytes_sent_.fetch_add(n);
  return Status::Ok();
}

Status ZmqGroup::Send(int peer, uint64_t tag, std::vector<uint8_t> bytes) {
  if (peer < 0 || peer >= size_) {
    return Status::InvalidArgument("process group: Send to rank " + std::to_string(peer) + " of a group of " +
                                   std::to_string(size_));
  }
  if (tag == kReservedTag) return Status::InvalidArgument("process group: tag 2^64-1 is reserved");
  if (bytes.size() > transport::kMaxPayloadBytes - kTrailerBytes) {
    return Status::InvalidArgument("process group: message of " + std::to_string(bytes.size()) +
                                   " bytes exceeds the transport's 1 GiB limit");
  }
  if (auto why = mailbox_.abort_reason()) {
    return Status::IOError("process group rank " + std::to_string(rank_) + " aborted: " + *why);
  }
  return Enqueue(peer, tag, std::move(bytes));
}

Expected<std::vector<uint8_t>> ZmqGroup::Recv(int peer, uint64_t tag, int timeout_ms) {
  if (peer < 0 || peer >= size_) {
    return Status::InvalidArgument("process group: Recv from rank " + std::to_string(peer) + " of a group of " +
                                   std::to_string(size_));
  }
  double waited = 0;
  auto out = mailbox_.Take(rank_, peer, tag, timeout_ms, &waited);
  std::lock_guard<std::mutex> lock(wait_mu_);
  recv_wait_s_ += waited;
  return out;
}

void ZmqGroup::Abort(const std::string& why) {
  mailbox_.Abort(why);
  std::lock_guard<std::mutex> lock(send_mu_);
  queue_.clear();  // refuse further traffic: what is still queued will not be sent
}

CommStats ZmqGroup::stats() const {
  CommStats s;
  s.messages_sent = messages_sent_.load();
  s.bytes_sent = bytes_sent_.load();
  s.messages_received = messages_received_.load();
  s.bytes_received = bytes_received_.load();
  s.dropped_frames = dropped_.load() + server_malformed_.load();
  s.send_thread_cpu_s = static_cast<double>(send_cpu_ns_.load()) * 1e-9;
  s.recv_thread_cpu_s = static_cast<double>(recv_cpu_ns_.load()) * 1e-9;
  std::lock_guard<std::mutex> lock(wait_mu_);
  s.recv_wait_s = recv_wait_s_;
  return s;
}

void ZmqGroup::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    stopping_ = true;
  }
  send_cv_.notify_all();
  if (send_thread_.joinable()) send_thread_.join();  // flushes the queue first
  stop_receiving_.store(true);
  if (!admit_set_) {
    admit_.set_value(std::nullopt);  // releases a receive thread still waiting for its allow-list
    admit_set_ = true;
  }
  if (recv_thread_.joinable()) recv_thread_.join();
}

}  // namespace

Expected<std::unique_ptr<ProcessGroup>> CreateZmqGroup(int rank, int size, const transport::KeyPair& self,
                                                       const std::string& bind_endpoint, Rendezvous& rendezvous,
                                                       int connect_timeout_ms) {
  if (size < 1 || rank < 0 || rank >= size) {
    return Status::InvalidArgument("process group: rank " + std::to_string(rank) + " of size " + std::to_string(size));
  }
  TROUPE_RETURN_IF_ERROR(transport::ValidateKeyPair(self).WithContext("process group: this rank's key pair"));
  auto group = std::make_unique<ZmqGroup>(rank, size, self);
  TROUPE_RETURN_IF_ERROR(group->Start(bind_endpoint, rendezvous, connect_timeout_ms));
  return std::unique_ptr<ProcessGroup>(std::move(group));
}

}  // namespace troupe::parallel
