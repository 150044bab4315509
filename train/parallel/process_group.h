// The process group a distributed training job's ranks talk over: tagged point-to-point messages between `size`
// ranks, the layer under the collectives (collectives.h) and the pipeline executor.
//
//   rank r                                             rank p
//   Send(p, tag, bytes) ─▶ send queue ─▶ send thread ══ CURVE/ZeroMQ ══▶ receive thread ─▶ Mailbox[(r, tag)]
//                                       (owns the         (one DEALER      (owns the            │
//                                        clients)          per peer)        server)   Recv(r, tag) ◀┘
//
// Two implementations: CreateLocalGroup (n ranks as threads of one process, for tests and single-process runs)
// and CreateZmqGroup (one process per rank; every connection authenticated with the ranks' CURVE keys).
// Ordering: messages with the same (sender, tag) are received in the order sent; nothing is promised across tags.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "actors/transport/keys.h"
#include "common/status.h"

namespace troupe::parallel {

// Counters of one rank's group, all since creation.
struct CommStats {
  uint64_t messages_sent = 0;      // Send calls that succeeded (self-sends included)
  uint64_t bytes_sent = 0;         // their payload bytes
  uint64_t messages_received = 0;  // messages delivered to this rank's mailbox
  uint64_t bytes_received = 0;     // their payload bytes
  uint64_t dropped_frames = 0;     // malformed frames and frames whose claimed sender lied (never delivered)
  // CPU seconds of the group's send / receive threads (framing, CRC32C, copies, socket calls; idle waits cost
  // none). CURVE encryption runs on libzmq's own I/O threads and is not included. 0 for the local group.
  double send_thread_cpu_s = 0;
  double recv_thread_cpu_s = 0;
  // Wall seconds callers spent blocked in Recv, summed over threads: the communication compute did not hide.
  double recv_wait_s = 0;
};

// Bytes a caller may reserve past a Send payload's end (capacity, not size) so the implementation can append its
// routing trailer without reallocating the payload. Optional: without it Send still works, with one extra copy.
inline constexpr size_t kSendReserveBytes = 16;

// One rank's view of a group of `size` ranks (0..size-1). Thread-safe: the pipeline executor sends and receives
// from several threads at once.
class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Queues `bytes` for `peer` and returns at once (a communication thread does the I/O, so compute overlaps it).
  // Messages with the same (peer, tag) arrive in the order sent. Send to self is allowed (delivered locally).
  // The queue is unbounded: callers bound the data in flight by waiting on receives, as every collective does.
  // InvalidArgument for a peer out of range, the reserved tag (kReservedTag) or (ZeroMQ group) a payload over the
  // transport's 1 GiB frame limit; IOError once the group was aborted (naming why).
  virtual Status Send(int peer, uint64_t tag, std::vector<uint8_t> bytes) = 0;
  // Waits up to timeout_ms (-1 = forever) for the next message from (peer, tag). IOError on timeout (naming peer,
  // tag and ms) or when the group is aborted (naming why). Malformed frames never reach Recv: they are counted
  // (stats().dropped_frames) and dropped.
  virtual Expected<std::vector<uint8_t>> Recv(int peer, uint64_t tag, int timeout_ms) = 0;
  // Wakes every waiter with `why` and refuses further traffic: used when a peer is known dead. The first reason
  // sticks; later calls do nothing.
  virtual void Abort(const std::string& why) = 0;
  virtual CommStats stats() const = 0;
};

// Told when the calling thread starts and stops blocking in a Recv whose message has not arrived (a message
// already there costs no wait and calls nothing). A thread installs one with ScopedCommWaitObserver: the pipeline
// runner does, on each thread of an F&B pair, to see which chunk waits while the other computes (OverlapMeter).
// Called with the receiving mailbox's lock held: implementations must not call back into the group.
class CommWaitObserver {
 public:
  virtual ~CommWaitObserver() = default;
  virtual void OnCommWait(bool waiting) = 0;
};

// Installs `observer` for the calling thread until destruction (then the previous one is back).
class ScopedCommWaitObserver {
 public:
  explicit ScopedCommWaitObserver(CommWaitObserver* observer);
  ~ScopedCommWaitObserver();
  ScopedCommWaitObserver(const ScopedCommWaitObserver&) = delete;
  ScopedCommWaitObserver& operator=(const ScopedCommWaitObserver&) = delete;

 private:
  CommWaitObserver* previous_;
};

// The calling thread's observer (null when none): for waits outside a Recv
// that stand for one (a pipeline receive over a device link).
CommWaitObserver* CurrentCommWaitObserver();

// The one tag the implementations keep for their own bootstrap messages; Send refuses it.
inline constexpr uint64_t kReservedTag = ~uint64_t{0};

// The receive side every implementation shares: per (sender, tag) FIFO queues and the abort state. Thread-safe.
class Mailbox {
 public:
  // Appends a message; dropped once aborted (a dead group delivers nothing).
  void Deliver(int sender, uint64_t tag, std::vector<uint8_t> bytes);
  // The oldest message from (sender, tag), waiting up to timeout_ms (-1 = forever). `self` only names the
  // receiving rank in errors. Adds the time waited to *waited_s.
  Expected<std::vector<uint8_t>> Take(int self, int sender, uint64_t tag, int timeout_ms, double* waited_s);
  void Abort(const std::string& why);
  std::optional<std::string> abort_reason() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<int, uint64_t>, std::deque<std::vector<uint8_t>>> queues_;  // empty queues are erased
  std::optional<std::string> abort_reason_;
};

// n ranks in one process (threads share the mailboxes); for unit tests and single-process multi-rank runs.
// Send moves the payload straight into the receiver's mailbox. Abort affects only the aborting rank's view (as a
// dead process would: the others notice by their Recv timeouts). Precondition: n >= 1.
std::vector<std::unique_ptr<ProcessGroup>> CreateLocalGroup(int n);

// Where a rank listens and the key it authenticates with.
struct PeerAddress {
  std::string endpoint;    // "tcp://127.0.0.1:41234"
  std::string public_key;  // Z85, 40 chars
};

// How ranks find each other before any socket exists. Bootstrap is two rounds: addresses, then "ready" (this
// rank's server now admits every published key). A client must not connect before its server is ready: libzmq
// never retries a handshake the server refused.
class Rendezvous {
 public:
  virtual ~Rendezvous() = default;
  virtual Status Publish(int rank, const PeerAddress& address) = 0;
  // All `size` addresses, by rank, once every rank has published. IOError on timeout naming the missing ranks;
  // Corruption for a malformed entry.
  virtual Expected<std::vector<PeerAddress>> WaitForAll(int size, int timeout_ms) = 0;
  virtual Status MarkReady(int rank) = 0;
  // OK once every rank 0..size-1 is ready. IOError on timeout naming the missing ranks.
  virtual Status WaitAllReady(int size, int timeout_ms) = 0;
};

// A rendezvous in a shared directory (local disk or a shared file system), which must exist and be fresh for each
// job (old entries would be taken as this job's). Rank i writes rank-<i>.json {"rank", "endpoint", "public_key"}
// and then ready-<i>, each atomically (temp file + rename: a reader never sees half a file). Waits poll every
// poll_ms. A malformed file is refused at once (Corruption naming the file and the problem).
class FileRendezvous final : public Rendezvous {
 public:
  explicit FileRendezvous(std::string dir, int poll_ms = 10);
  Status Publish(int rank, const PeerAddress& address) override;
  Expected<std::vector<PeerAddress>> WaitForAll(int size, int timeout_ms) override;
  Status MarkReady(int rank) override;
  Status WaitAllReady(int size, int timeout_ms) override;

 private:
  std::string dir_;
  int poll_ms_;
};

// One process per rank over CURVE-authenticated ZeroMQ. The rank binds a SecureServer on `bind_endpoint` ("tcp://
// 127.0.0.1:0" picks a free port) whose allow-list is exactly the other ranks' published keys, publishes its
// address, waits for everyone's, marks itself ready, connects one SecureClient to every other rank and waits for
// each CURVE handshake and for a hello from every rank. connect_timeout_ms bounds the rendezvous's waits (the
// rendezvous may wait longer, or end them itself) and, from the moment every rank is ready, again the connecting; the error
// names the ranks that never answered or that refused us. A message whose claimed sender does not own the key
// its connection authenticated with is dropped and counted. The rendezvous is trusted: whoever can write it
// decides the allow-lists. Destruction sends what is still queued, waiting up to 1 s per unreachable peer.
// A size-1 group opens no socket.
Expected<std::unique_ptr<ProcessGroup>> CreateZmqGroup(int rank, int size, const transport::KeyPair& self,
                                                       const std::string& bind_endpoint, Rendezvous& rendezvous,
                                                       int connect_timeout_ms);

}  // namespace troupe::parallel
