// The mailbox every process group shares, the in-process group, and the file rendezvous.
// (The ZeroMQ group lives in zmq_process_group.cpp.)
#include "train/parallel/process_group.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

namespace troupe::parallel {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

std::string Ranks(const std::vector<int>& ranks) {
  std::string out;
  for (int r : ranks) out += (out.empty() ? "" : ", ") + std::to_string(r);
  return out;
}

thread_local CommWaitObserver* tls_wait_observer = nullptr;

}  // namespace

ScopedCommWaitObserver::ScopedCommWaitObserver(CommWaitObserver* observer) : previous_(tls_wait_observer) {
  tls_wait_observer = observer;
}

ScopedCommWaitObserver::~ScopedCommWaitObserver() { tls_wait_observer = previous_; }

CommWaitObserver* CurrentCommWaitObserver() { return tls_wait_observer; }

// ================================ Mailbox ==================================

void Mailbox::Deliver(int sender, uint64_t tag, std::vector<uint8_t> bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (abort_reason_) return;
    queues_[{sender, tag}].push_back(std::move(bytes));
  }
  // All waiters wake and re-check their own key: a group has few concurrent receivers, so this is cheaper than
  // a condition variable per (sender, tag).
  cv_.notify_all();
}

Expected<std::vector<uint8_t>> Mailbox::Take(int self, int sender, uint64_t tag, int timeout_ms, double* waited_s) {
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  std::unique_lock<std::mutex> lock(mu_);
  const auto key = std::make_pair(sender, tag);
  auto ready = [&] { return abort_reason_.has_value() || queues_.count(key) != 0; };
  bool got = true;
  CommWaitObserver* observer = ready() ? nullptr : tls_wait_observer;
  if (observer) observer->OnCommWait(true);
  if (timeout_ms < 0) {
    cv_.wait(lock, ready);
  } else {
    got = cv_.wait_until(lock, deadline, ready);
  }
  if (observer) observer->OnCommWait(false);
  if (waited_s) *waited_s += std::chrono::duration<double>(Clock::now() - start).count();
  if (abort_reason_) {
    return Status::IOError("process group rank " + std::to_string(self) + " aborted: " + *abort_reason_);
  }
  if (!got) {
    return Status::IOError("process group rank " + std::to_string(self) + ": no message from rank " +
                           std::to_string(sender) + " with tag " + std::to_string(tag) + " within " +
                           std::to_string(timeout_ms) + " ms");
  }
  auto it = queues_.find(key);
  std::vector<uint8_t> out = std::move(it->second.front());
  it->second.pop_front();
  if (it->second.empty()) queues_.erase(it);  // tags are often used once: keep the map small
  return out;
}

void Mailbox::Abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (abort_reason_) return;
    abort_reason_ = why;
    queues_.clear();
  }
  cv_.notify_all();
}

std::optional<std::string> Mailbox::abort_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return abort_reason_;
}

// =============================== Local group ===============================

namespace {

// What the ranks of one local group share: one mailbox per rank, and what arrived in it.
struct LocalShared {
  struct Arrivals {
    std::atomic<uint64_t> messages{0};
    std::atomic<uint64_t> bytes{0};
  };
  explicit LocalShared(int n) : boxes(static_cast<size_t>(n)), arrived(static_cast<size_t>(n)) {}
  std::vector<Mailbox> boxes;
  std::vector<Arrivals> arrived;
};

class LocalGroup final : public ProcessGroup {
 public:
  LocalGroup(int rank, std::shared_ptr<LocalShared> shared) : rank_(rank), shared_(std::move(shared)) {}

  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(shared_->boxes.size()); }

  Status Send(int peer, uint64_t tag, std::vector<uint8_t> bytes) override {
    if (peer < 0 || peer >= size()) {
      return Status::InvalidArgument("process group: Send to rank " + std::to_string(peer) + " of a group of " +
                                     std::to_string(size()));
    }
    if (tag == kReservedTag) return Status::InvalidArgument("process group: tag 2^64-1 is reserved");
    if (auto why = Self().abort_reason()) {
      return Status::IOError("process group rank " + std::to_string(rank_) + " aborted: " + *why);
    }
    const uint64_t n = bytes.size();
    const auto p = static_cast<size_t>(peer);
    shared_->boxes[p].Deliver(rank_, tag, std::move(bytes));
    shared_->arrived[p].messages.fetch_add(1);
    shared_->arrived[p].bytes.fetch_add(n);
    messages_sent_.fetch_add(1);
    bytes_sent_.fetch_add(n);
    return Status::Ok();
  }

  Expected<std::vector<uint8_t>> Recv(int peer, uint64_t tag, int timeout_ms) override {
    if (peer < 0 || peer >= size()) {
      return Status::InvalidArgument("process group: Recv from rank " + std::to_string(peer) + " of a group of " +
                                     std::to_string(size()));
    }
    double waited = 0;
    auto out = Self().Take(rank_, peer, tag, timeout_ms, &waited);
    std::lock_guard<std::mutex> lock(wait_mu_);
    recv_wait_s_ += waited;
    return out;
  }

  void Abort(const std::string& why) override { Self().Abort(why); }

  CommStats stats() const override {
    CommStats s;
    s.messages_sent = messages_sent_.load();
    s.bytes_sent = bytes_sent_.load();
    s.messages_received = shared_->arrived[static_cast<size_t>(rank_)].messages.load();
    s.bytes_received = shared_->arrived[static_cast<size_t>(rank_)].bytes.load();
    std::lock_guard<std::mutex> lock(wait_mu_);
    s.recv_wait_s = recv_wait_s_;
    return s;
  }

 private:
  Mailbox& Self() { return shared_->boxes[static_cast<size_t>(rank_)]; }

  const int rank_;
  std::shared_ptr<LocalShared> shared_;
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> bytes_sent_{0};
  mutable std::mutex wait_mu_;  // guards recv_wait_s_
  double recv_wait_s_ = 0;
};

}  // namespace

std::vector<std::unique_ptr<ProcessGroup>> CreateLocalGroup(int n) {
  auto shared = std::make_shared<LocalShared>(n);
  std::vector<std::unique_ptr<ProcessGroup>> out;
  for (int r = 0; r < n; ++r) out.push_back(std::make_unique<LocalGroup>(r, shared));
  return out;
}

// ============================= File rendezvous =============================

namespace {

// Writes `text` to dir/name through a temp file and a rename, so readers see all of it or nothing.
Status WriteAtomically(const std::string& dir, const std::string& name, const std::string& text) {
  const fs::path final_path = fs::path(dir) / name;
  const fs::path tmp = fs::path(dir) / ("." + name + ".tmp-" + std::to_string(::getpid()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) return Status::IOError("rendezvous: cannot write " + tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, final_path, ec);
  if (ec) return Status::IOError("rendezvous: cannot rename " + tmp.string() + ": " + ec.message());
  return Status::Ok();
}

Expected<PeerAddress> ParseAddressFile(const fs::path& path, int rank) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("rendezvous: cannot read " + path.string());
  std::stringstream text;
  text << in.rdbuf();
  const auto bad = [&](const std::string& why) {
    return Status::Corruption("rendezvous: " + path.string() + ": " + why);
  };
  const nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return bad("not valid JSON");
  if (!j.is_object()) return bad("expected a JSON object {\"rank\", \"endpoint\", \"public_key\"}");
  if (!j.contains("rank") || !j["rank"].is_number_integer() || j["rank"].get<int64_t>() != rank) {
    return bad("\"rank\" must be the integer " + std::to_string(rank));
  }
  if (!j.contains("endpoint") || !j["endpoint"].is_string() || j["endpoint"].get<std::string>().empty()) {
    return bad("\"endpoint\" must be a non-empty string");
  }
  if (!j.contains("public_key") || !j["public_key"].is_string()) return bad("\"public_key\" must be a string");
  PeerAddress a{j["endpoint"].get<std::string>(), j["public_key"].get<std::string>()};
  const Status key = transport::ValidateKey(a.public_key, "public_key");
  if (!key.ok()) return bad(key.message());
  return a;
}

// Polls until `present(i)` holds for every rank below `size`; the error names those still missing.
template <typename Present>
Status PollAll(int size, int timeout_ms, int poll_ms, const std::string& what, Present present) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  std::vector<bool> done(static_cast<size_t>(size), false);
  while (true) {
    std::vector<int> missing;
    for (int i = 0; i < size; ++i) {
      if (done[static_cast<size_t>(i)]) continue;
      auto got = present(i);
      if (!got.ok()) return got.status();
      if (got.value()) {
        done[static_cast<size_t>(i)] = true;
      } else {
        missing.push_back(i);
      }
    }
    if (missing.empty()) return Status::Ok();
    if (Clock::now() >= deadline) {
      return Status::IOError("rendezvous: ranks " + Ranks(missing) + " never " + what + " (waited " +
                             std::to_string(timeout_ms) + " ms)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(poll_ms));
  }
}

}  // namespace

FileRendezvous::FileRendezvous(std::string dir, int poll_ms) : dir_(std::move(dir)), poll_ms_(poll_ms) {}

Status FileRendezvous::Publish(int rank, const PeerAddress& address) {
  const nlohmann::json j = {{"rank", rank}, {"endpoint", address.endpoint}, {"public_key", address.public_key}};
  return WriteAtomically(dir_, "rank-" + std::to_string(rank) + ".json", j.dump() + "\n");
}

Expected<std::vector<PeerAddress>> FileRendezvous::WaitForAll(int size, int timeout_ms) {
  std::vector<PeerAddress> out(static_cast<size_t>(size));
  TROUPE_RETURN_IF_ERROR(
      PollAll(size, timeout_ms, poll_ms_, "published an address in " + dir_, [&](int i) -> Expected<bool> {
        const fs::path p = fs::path(dir_) / ("rank-" + std::to_string(i) + ".json");
        std::error_code ec;
        if (!fs::exists(p, ec)) return false;
        TROUPE_ASSIGN_OR_RETURN(out[static_cast<size_t>(i)], ParseAddressFile(p, i));
        return true;
      }));
  return out;
}

Status FileRendezvous::MarkReady(int rank) { return WriteAtomically(dir_, "ready-" + std::to_string(rank), "ready\n"); }

Status FileRendezvous::WaitAllReady(int size, int timeout_ms) {
  return PollAll(size, timeout_ms, poll_ms_, "became ready in " + dir_, [&](int i) -> Expected<bool> {
    std::error_code ec;
    return fs::exists(fs::path(dir_) / ("ready-" + std::to_string(i)), ec);
  });
}

}  // namespace troupe::parallel
