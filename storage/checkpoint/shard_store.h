// ShardStore: one node's tensor shards, in an embedded RocksDB under
// <data dir>/shards.
//
// A shard is rows [row_begin, row_end) of one tensor of one checkpoint. Its
// bytes are cut into chunks of at most kChunkBytes (so a large tensor never
// needs one huge value), each stored under
//   "c/<checkpoint>/<tensor>/<row_begin:012>/<chunk:06>"
// as a cereal-serialised {crc32c, bytes}; a header
//   "s/<checkpoint>/<tensor>/<row_begin:012>"
// holds {row_end, row_bytes, chunk count, total bytes, crc32c of all bytes}
// and is written in the same batch as the last chunk. Reads check every
// chunk's CRC32C and the whole shard's, so a flipped byte on disk is a
// Corruption naming the shard, never silently wrong numbers.
//
// Durability: Put() bypasses the write-ahead log (shard bytes are written
// once, into table files); Sync() flushes the memtable to synced table
// files. A crash before Sync() loses only an uncommitted save. A saver
// calls Sync() once after its last Put() and only then reports the shards
// durable. Thread-safety: RocksDB's (any thread). Sync() waits for a flush
// on RocksDB's background threads: a process forked after RocksDB started
// them (any database opened) has none, and its Sync() never returns.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace rocksdb {
class DB;
}

namespace troupe::ckpt {

inline constexpr size_t kChunkBytes = 4u << 20;

struct ShardKey {
  std::string checkpoint;
  std::string tensor;
  int64_t row_begin = 0;
};

struct ShardInfo {
  ShardKey key;
  int64_t row_end = 0;
  uint64_t bytes = 0;
  uint32_t crc32c = 0;
};

class ShardStore {
 public:
  // Opens (creating if needed) <dir>/shards. `id` names the store in
  // manifests (e.g. the node id). IOError naming the path if RocksDB refuses.
  static Expected<std::unique_ptr<ShardStore>> Open(const std::string& dir, std::string id);
  ~ShardStore();

  const std::string& id() const { return id_; }
  const std::string& path() const { return path_; }

  // Stores rows [key.row_begin, row_end) whose bytes are `bytes`; returns
  // their CRC32C. InvalidArgument on an empty name or a '/' in names, or on
  // row_begin < 0 or row_end < row_begin.
  Expected<uint32_t> Put(const ShardKey& key, int64_t row_end, std::span<const uint8_t> bytes);
  // Makes every Put() so far durable (a memtable flush into synced table files).
  Status Sync();

  // The shard's bytes, verified. NotFound if absent; Corruption naming the
  // shard if a chunk or the header fails its checksum or is malformed.
  // `crc32c`, when given, receives the bytes' CRC32C (already checked
  // against them, so callers compare it instead of hashing again).
  Expected<std::vector<uint8_t>> Get(const ShardKey& key, uint32_t* crc32c = nullptr) const;
  // Re-reads and checks a shard without keeping its bytes.
  Status Verify(const ShardKey& key) const;

  // The shards of one checkpoint, or (empty name) of all checkpoints.
  Expected<std::vector<ShardInfo>> List(const std::string& checkpoint = "") const;
  // Ids with at least one shard, or chunks of one (a Put() that crashed
  // before its header), sorted.
  std::vector<std::string> Checkpoints() const;
  // Drops every shard of `checkpoint` (a range delete, then synced).
  Status Drop(const std::string& checkpoint);

  // For tests: flips one byte of the stored value of the shard's first chunk
  // (what disk rot or a bad write would do).
  Status CorruptForTest(const ShardKey& key);

 private:
  ShardStore(rocksdb::DB* db, std::string id, std::string path) : db_(db), id_(std::move(id)), path_(std::move(path)) {}
  rocksdb::DB* db_;
  std::string id_;
  std::string path_;
};

}  // namespace troupe::ckpt
