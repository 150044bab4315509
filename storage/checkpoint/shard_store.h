// ShardStore: one node's tensor shards, in a folder <data dir>: an index in
// an embedded RocksDB under <data dir>/shards and the shard bytes in one
// append-only file per checkpoint under <data dir>/chunks.
//
// A shard is rows [row_begin, row_end) of one tensor of one checkpoint. Its
// bytes are cut into chunks of at most kChunkBytes, written one after the
// other into "chunks/<checkpoint>.chunks" (a file that starts with a
// 64-byte header: magic, format version, checkpoint id). The shard's
// header, in RocksDB under
//   "s/<checkpoint>/<tensor>/<row_begin:012>",
// holds {format version, row_end, bytes, chunk count, CRC32C of all bytes,
// chunk size, the file offset of the first chunk, every chunk's CRC32C} and
// is written after the last chunk. Reads check every chunk's CRC32C and the whole shard's, so a
// flipped byte on disk is a Corruption naming the shard, never silently
// wrong numbers.
//
// Format versions (the shard header's first field): 2 is the above, and the
// only one written. 1 (before 2026-11) kept each chunk inside RocksDB as a
// cereal {crc32c, bytes} value under "c/<checkpoint>/<tensor>/<row>/<chunk:06>";
// it is still read, so older checkpoints load. Any other version is a
// Corruption naming it.
//
// Why the bytes are not RocksDB values: a value goes through a write batch,
// the memtable and a flush into a table file, three copies of every byte
// into fresh memory, and a save of more than one memtable gets compacted,
// i.e. written again. Saves that way ran at 0.2-0.3 of the raw disk
// bandwidth, and the best RocksDB setup tried wrote at half the speed of
// plain file writes; with chunk files saves run at ~0.9 of raw
// (bench/RESULTS.md). RocksDB keeps what it is good at: the small,
// atomically updated, checksummed index.
//
// Durability: Put() writes chunks with plain buffered writes and the header
// without the write-ahead log; Sync() fdatasyncs every chunk file written
// since the last Sync() (and its folder, for new files), then flushes the
// headers into synced table files, so Sync() never makes a header durable
// before its bytes. A crash before Sync() loses only an uncommitted save
// (its chunks, with or without headers, are garbage that Drop() removes:
// Checkpoints() lists the ids of chunk files too; a header RocksDB flushed
// on its own, e.g. at a clean close, whose bytes a power loss then took,
// fails its CRC32C). A saver calls Sync() once after its last Put() and
// only then reports the shards durable.
//
// Thread-safety: every method may be called from any thread, Put() from
// several at once (SaveCheckpoint writes shards in parallel); Sync() and
// Drop() must not run concurrently with a Put() of the same checkpoint.
// Sync() waits for a flush on RocksDB's background threads: a process
// forked after RocksDB started them (any database opened) has none, and its
// Sync() never returns.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace rocksdb {
class DB;
}

namespace troupe::ckpt {

inline constexpr size_t kChunkBytes = 4u << 20;
// The shard format this build writes (see the file comment); it reads 1 and 2.
inline constexpr uint32_t kShardFormatVersion = 2;

// CRC32C of the concatenation A ++ B from crc_a = Crc32c(A), crc_b =
// Crc32c(B) and B's length, without touching the bytes (zlib's
// crc32_combine for the Castagnoli polynomial; O(log len_b)). Lets a save
// hash every byte once: chunk CRCs make the shard's, shards' the tensor's.
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

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
  // Opens (creating if needed) <dir>/shards and <dir>/chunks. `id` names
  // the store in manifests (e.g. the node id). IOError naming the path if
  // RocksDB or the file system refuses.
  static Expected<std::unique_ptr<ShardStore>> Open(const std::string& dir, std::string id);
  // An existing store, for reading only (Get, Verify, List, Checkpoints):
  // several processes may read one store at once, e.g. the ranks of a
  // distributed run restoring a checkpoint whose shards another rank wrote.
  // Put, Sync and Drop are refused. NotFound when `dir` holds no store.
  static Expected<std::unique_ptr<ShardStore>> OpenReadOnly(const std::string& dir, std::string id);
  ~ShardStore();

  const std::string& id() const { return id_; }
  const std::string& path() const { return path_; }               // the RocksDB index, <dir>/shards
  const std::string& chunks_path() const { return chunks_dir_; }  // <dir>/chunks

  // Stores rows [key.row_begin, row_end) whose bytes are `bytes`; returns
  // their CRC32C. InvalidArgument on an empty name or a '/' in names, or on
  // row_begin < 0 or row_end < row_begin; IOError if a write fails. A shard
  // put again replaces the first (whose bytes stay in the file, unused,
  // until the checkpoint is dropped).
  Expected<uint32_t> Put(const ShardKey& key, int64_t row_end, std::span<const uint8_t> bytes);
  // Makes every Put() so far durable (see the file comment).
  Status Sync();

  // The shard's bytes, verified. NotFound if absent; Corruption naming the
  // shard if a chunk or the header fails its checksum, is malformed or has
  // an unknown format version. `crc32c`, when given, receives the bytes'
  // CRC32C (already checked against them, so callers compare it instead of
  // hashing again).
  Expected<std::vector<uint8_t>> Get(const ShardKey& key, uint32_t* crc32c = nullptr) const;
  // Re-reads and checks a shard without keeping its bytes.
  Status Verify(const ShardKey& key) const;

  // The shards of one checkpoint, or (empty name) of all checkpoints.
  Expected<std::vector<ShardInfo>> List(const std::string& checkpoint = "") const;
  // Ids with at least one shard, or with chunks (a Put() that crashed
  // before its header), sorted.
  std::vector<std::string> Checkpoints() const;
  // Drops every shard of `checkpoint`: a synced range delete of its
  // headers, then its chunk file.
  Status Drop(const std::string& checkpoint);

  // For tests: flips one byte of the shard's first chunk on disk (what disk
  // rot or a bad write would do). NotFound if the shard has no chunk.
  Status CorruptForTest(const ShardKey& key);

 private:
  // One checkpoint's chunk file, open for appending.
  struct ChunkFile {
    int fd = -1;
    uint64_t end = 0;      // where the next chunk goes
    bool created = false;  // new since the last Sync(): its folder entry needs a sync too
  };
  ShardStore(rocksdb::DB* db, std::string id, std::string dir);
  Status RefuseIfReadOnly(const char* what) const;
  std::string ChunkFilePath(const std::string& checkpoint) const;
  // The open chunk file of `checkpoint`, opened or created on first use. Call with mu_ held.
  Expected<ChunkFile*> OpenChunkFile(const std::string& checkpoint);
  void CloseChunkFiles();  // call with mu_ held

  rocksdb::DB* db_;
  std::string id_;
  std::string path_;
  std::string chunks_dir_;
  bool read_only_ = false;
  std::mutex mu_;  // guards files_
  std::map<std::string, ChunkFile> files_;
};

}  // namespace troupe::ckpt
