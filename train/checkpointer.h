// AsyncCheckpointer: saves training snapshots on its own thread.
//
// The training loop captures a snapshot (a device-to-host copy: the only
// stall a save causes) and hands it over; the writer thread cuts it into
// shards, writes and fsyncs them, commits the manifest and applies the
// retention policy while training goes on. One save at a time, so staging
// memory is bounded by one copy of the training state: a save requested
// while the previous one still runs waits for it first (counted as stall).
// A written snapshot is released before the next capture, so the trainer's
// staging arena (Trainer::Capture) is reused instead of allocated again;
// snapshots that own their bytes give them to ckpt::StagingPool::Shared().
//
// Folder layout (troupe train): <dir>/catalog, <dir>/store-<i>/shards with
// store ids "local-<i>". Opening it drops the shards of saves that crashed
// before their commit.
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "configs/config.h"
#include "storage/checkpoint/checkpoint_io.h"

namespace troupe {

struct SaveResult {
  Status status;
  ckpt::Manifest manifest;           // when status is OK
  double write_seconds = 0;          // shards written and synced, manifest committed
  std::vector<std::string> dropped;  // ids the retention policy removed
};

// One save at a time on a thread of its own: what both checkpointers
// (AsyncCheckpointer here, parallel::DistCheckpointer) run their writes on.
// Submit() waits for the job in flight before it hands over the next, so a
// saver never holds more than one staging copy. A finished job's result
// (nullopt: nothing to report) waits for Poll()/WaitIdle(); a newer one
// replaces it. The destructor waits for the job in flight.
template <typename Job>
class SaveWorker {
 public:
  using Work = std::function<std::optional<SaveResult>(Job&)>;
  explicit SaveWorker(Work work) : work_(std::move(work)), thread_([this] { Run(); }) {}
  ~SaveWorker() {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !busy_; });
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  SaveWorker(const SaveWorker&) = delete;
  SaveWorker& operator=(const SaveWorker&) = delete;

  // Blocks until no job is in flight (the result stays for Poll()).
  void WaitUntilIdle() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !busy_; });
  }
  void Submit(Job job) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !busy_; });
      pending_ = std::move(job);
      busy_ = true;
    }
    cv_.notify_all();
  }
  std::optional<SaveResult> Poll() {
    std::lock_guard<std::mutex> lock(mu_);
    std::optional<SaveResult> r = std::move(done_);
    done_.reset();
    return r;
  }
  std::optional<SaveResult> WaitIdle() {
    WaitUntilIdle();
    return Poll();
  }

 private:
  void Run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || pending_.has_value(); });
        if (!pending_) return;
        job = std::move(*pending_);
        pending_.reset();
      }
      std::optional<SaveResult> result = work_(job);
      // Gone before anyone sees the worker idle: a snapshot may hold memory
      // the next capture wants back (Trainer's staging arena).
      job = Job();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (result) done_ = std::move(result);
        busy_ = false;
      }
      cv_.notify_all();
    }
  }

  Work work_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<Job> pending_;
  bool busy_ = false;
  bool stop_ = false;
  std::optional<SaveResult> done_;
  std::thread thread_;  // last: starts once everything above exists
};

class AsyncCheckpointer {
 public:
  static Expected<std::unique_ptr<AsyncCheckpointer>> Open(const std::string& dir, const CheckpointConfig& config);
  ~AsyncCheckpointer();  // waits for the save in flight

  // Blocks until no save is in flight and returns the result of the last
  // finished save not yet collected (nullopt if none).
  std::optional<SaveResult> WaitIdle() { return worker_->WaitIdle(); }
  // Hands `snap` to the writer thread; waits first for a save still in
  // flight (call WaitIdle() first to collect its result, which the next
  // finished save would otherwise replace).
  void Submit(ckpt::Snapshot snap) { worker_->Submit(std::move(snap)); }
  // The finished save's result, if one finished since the last call.
  std::optional<SaveResult> Poll() { return worker_->Poll(); }

  ckpt::Catalog& catalog() { return *catalog_; }
  const ckpt::StoreSet& stores() const { return store_set_; }

 private:
  AsyncCheckpointer() = default;
  SaveResult Write(ckpt::Snapshot& snap);

  CheckpointConfig config_;
  std::unique_ptr<ckpt::Catalog> catalog_;
  std::vector<std::unique_ptr<ckpt::ShardStore>> stores_;
  ckpt::StoreSet store_set_;
  std::unique_ptr<SaveWorker<ckpt::Snapshot>> worker_;  // last: stopped first
};

// Store i of a checkpoint folder: <dir>/store-<i>, named "local-<i>" in
// manifests (troupe train's stores, and rank i's in a distributed run).
std::string LocalStoreDir(const std::string& dir, int i);
std::string LocalStoreId(int i);

// The stores a restore of `m` reads: `open` (already open by this process)
// and, opened for reading only, every other store of the folder that `m`
// names (a checkpoint another layout wrote: other processes may read them
// too). A store that cannot be opened is left out and its error added to
// `stats` (its shards' other copies may still serve).
struct ReadableStores {
  std::vector<std::unique_ptr<ckpt::ShardStore>> opened;
  ckpt::StoreSet stores;
};
ReadableStores OpenStoresFor(const std::string& dir, const ckpt::Manifest& m, const ckpt::StoreSet& open,
                             ckpt::ReadStats* stats);

// Opens the checkpoint folder for tools (no GC, no thread): the catalog and
// every store-<i> found under `dir`. `read_only`: takes no lock, so it works
// beside the run that writes the folder (and refuses every change).
struct CheckpointFolder {
  std::unique_ptr<ckpt::Catalog> catalog;
  std::vector<std::unique_ptr<ckpt::ShardStore>> stores;
  ckpt::StoreSet store_set;
};
Expected<CheckpointFolder> OpenCheckpointFolder(const std::string& dir, bool read_only = false);

}  // namespace troupe
