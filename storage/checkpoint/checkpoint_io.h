// Saving and restoring whole checkpoints over a set of shard stores.
//
// Save: reserve an id in the catalog, cut every tensor into row-range shards,
// write each shard to `replication` distinct stores, fsync every store, and
// only then commit the manifest. A crash anywhere before the commit leaves
// the previous checkpoints untouched and the new one invisible (its shards
// are garbage that CollectGarbage() drops).
//
// Restore: any row range of any tensor can be read back, whatever shards it
// was cut into when saved (so a checkpoint saved under one PP/EP/DP layout
// loads into another). A shard that is missing or fails its CRC32C on one
// store is read from the next store that keeps it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "storage/checkpoint/catalog.h"
#include "storage/checkpoint/manifest.h"
#include "storage/checkpoint/shard_store.h"

namespace troupe::ckpt {

// One tensor, copied to host memory: its own `bytes`, or (a capture into a
// staging arena) `view` into memory the snapshot keeps alive.
struct HostTensor {
  std::string name;
  std::string dtype;  // "F32", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
  std::span<const uint8_t> view;
  int64_t rows() const;
  // The tensor's bytes: `view` when set, else `bytes`.
  std::span<const uint8_t> data() const { return view.data() ? view : std::span<const uint8_t>(bytes); }
};

// Everything a checkpoint holds, in host memory. The tensors' order is kept.
struct Snapshot : RunState {
  std::vector<HostTensor> tensors;
  // A capture that copies in the background (Backend::CopyToHostAsync):
  // `ready` blocks until the bytes are there and says whether the copy
  // worked; `keepalive` owns the memory the views point into.
  std::function<Status()> ready;
  std::shared_ptr<const void> keepalive;
  uint64_t TotalBytes() const;
  // Waits for a background copy (no-op without one).
  Status WaitReady() const { return ready ? ready() : Status::Ok(); }
};

struct SaveOptions {
  int replication = 1;  // stores per shard; at most the number of stores
  // Every tensor is cut into this many row ranges (as equal as the rows
  // allow), e.g. the number of expert-parallel ranks that own its rows.
  int shards_per_tensor = 1;
  // Shard writes in flight at once (>= 1; 1 = all on the calling thread).
  // Two let one thread hash a chunk while the other's write copies into the
  // page cache: 0.76 -> 0.88 of raw bandwidth on the 2-core dev box
  // (bench/RESULTS.md).
  int threads = 2;
};

// The stores a checkpoint may use, by id.
using StoreSet = std::map<std::string, ShardStore*>;

// Waits for `snap` to be ready (Snapshot::WaitReady), then writes every
// shard of `snap` under the reserved id `id` and syncs the stores; returns
// the manifest to commit (its `id`, shards, stores and checksums filled
// in). Nothing is committed: a caller that replicates elsewhere first (the
// cluster: docs/checkpoints.md) commits later. On failure the shards
// written so far are dropped.
Expected<Manifest> WriteShards(const Snapshot& snap, const std::string& id, const StoreSet& stores,
                               const SaveOptions& options);

// ReserveId + WriteShards + Commit. InvalidArgument (before anything is written) on bad options, a tensor
// whose bytes do not fit its shape, a bad or repeated tensor name. Every
// byte of `snap` is read once (hashed, then written by a store).
Expected<Manifest> SaveCheckpoint(const Snapshot& snap, const StoreSet& stores, Catalog& catalog,
                                  const SaveOptions& options);

// Checkpoints written by many processes (the ranks of a distributed run:
// train/parallel/dist_checkpoint.h). Each writer owns some row ranges of
// some tensors, writes them into its own store, and reports what it wrote;
// one committer assembles the reports into the manifest's tensors.

// Rows [row_begin, row_end) of a tensor whose whole shape is `shape`.
struct HostPiece {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;  // the whole tensor's
  int64_t row_begin = 0, row_end = 0;
  std::vector<uint8_t> bytes;
};

// A written piece, as its writer reports it: the tensor it belongs to and
// the shard (rows, CRC32C, the store that keeps it).
struct PieceRecord {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t row_bytes = 0;
  ShardRef shard;
  bool operator==(const PieceRecord&) const = default;
};

// Writes every piece under the checkpoint id `id` into `store` and syncs it
// (on `threads` threads). InvalidArgument before anything is written for a
// bad id or name, a piece whose bytes are not whole rows of its shape or
// that runs past its tensor's rows. On failure the pieces written so far
// are dropped.
Expected<std::vector<PieceRecord>> WritePieces(const std::vector<HostPiece>& pieces, const std::string& id,
                                               ShardStore& store, int threads = 2);

// The manifest's tensors from every writer's reports, in `order` (which
// must name every tensor reported, once). Pieces of the same rows are
// copies (replicas on other stores): their stores are merged, their CRC32Cs
// must agree. Corruption naming the tensor when
// the pieces of a tensor disagree on dtype or shape, overlap, or leave rows
// uncovered, or a tensor of `order` has no piece. The tensor's CRC32C is
// combined from its shards' (no byte is read again).
Expected<std::vector<TensorRecord>> AssembleTensors(std::vector<PieceRecord> pieces,
                                                    const std::vector<std::string>& order);

struct ReadStats {
  int shards_read = 0;
  int replica_fallbacks = 0;          // shards served by a later store after a failure
  std::vector<std::string> failures;  // what failed on the way, one line each
};

// Rows [row_begin, row_end) of `tensor`, verified.
Expected<std::vector<uint8_t>> ReadRows(const TensorRecord& tensor, const std::string& checkpoint, int64_t row_begin,
                                        int64_t row_end, const StoreSet& stores, ReadStats* stats = nullptr);
// The whole checkpoint as a Snapshot (every tensor's whole-tensor CRC checked).
Expected<Snapshot> LoadCheckpoint(const Manifest& m, const StoreSet& stores, ReadStats* stats = nullptr);

// Checks every replica of every shard. OK only if each shard has at least
// one good copy; `problems` lists every bad or missing replica.
Status VerifyCheckpoint(const Manifest& m, const StoreSet& stores, std::vector<std::string>* problems);

// Drops shards of checkpoints the catalog does not hold (crashed saves) and
// of the ones `policy` expires (removing their manifests first). `keep` is
// an id being written right now. Returns the ids dropped.
Expected<std::vector<std::string>> CollectGarbage(Catalog& catalog, const StoreSet& stores,
                                                  const RetentionPolicy& policy, const std::string& keep = "");

// Host staging buffers recycled between saves. Allocating a fresh host copy
// of the training state for every capture costs a zero fill and a page
// fault per 4 KiB page on top of the copy itself (on the dev VM the faults
// alone cost more than the copy); AsyncCheckpointer gives a written
// snapshot's buffers back here and the next capture takes them instead.
// Memory: Recycle() keeps one snapshot's buffers and frees whatever it kept
// before, so the pool never holds more than one host copy of the training
// state (which stays allocated between saves). Thread-safe.
class StagingPool {
 public:
  // The process's pool: DistributedTrainer::CapturePieces takes from it,
  // DistCheckpointer gives back to it. (Trainer::Capture has an arena of its
  // own: Trainer::PrepareCapture.)
  static StagingPool& Shared();
  // A buffer of exactly `bytes` bytes, contents unspecified (a recycled one
  // of that size if the pool has one, else a new zeroed one).
  std::vector<uint8_t> Take(size_t bytes);
  // Keeps the buffers of `snap`'s tensors (and frees what was kept before).
  void Recycle(Snapshot&& snap);
  // The same for loose buffers (a distributed run's pieces).
  void Recycle(std::vector<std::vector<uint8_t>>&& buffers);
  // Frees every kept buffer.
  void Clear();
  uint64_t bytes_kept() const;

 private:
  mutable std::mutex mu_;
  std::multimap<size_t, std::vector<uint8_t>> free_;  // by size
  uint64_t kept_ = 0;
};

}  // namespace troupe::ckpt
