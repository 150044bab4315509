#include "storage/checkpoint/shard_store.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <cereal/archives/portable_binary.hpp>
#include <algorithm>
#include <cereal/types/string.hpp>
#include <cinttypes>
#include <cstdio>
#include <set>
#include <sstream>

#include "common/crc32c.h"
#include "storage/rocksdb_open.h"

namespace troupe::ckpt {
namespace {

struct ChunkValue {
  uint32_t crc32c = 0;
  std::string bytes;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(crc32c, bytes);
  }
};

struct ShardHeader {
  uint32_t version = 1;
  int64_t row_end = 0;
  uint64_t bytes = 0;
  uint32_t chunks = 0;
  uint32_t crc32c = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(version, row_end, bytes, chunks, crc32c);
  }
};

template <typename T>
std::string Encode(const T& v) {
  std::ostringstream os;
  {
    cereal::PortableBinaryOutputArchive ar(os);
    ar(v);
  }
  return os.str();
}

template <typename T>
bool Decode(const std::string& s, T& v) {
  try {
    std::istringstream is(s);
    cereal::PortableBinaryInputArchive ar(is);
    ar(v);
    return true;
  } catch (const cereal::Exception&) {
    return false;
  } catch (const std::bad_alloc&) {  // a hostile length prefix
    return false;
  }
}

uint32_t Crc(std::span<const uint8_t> b, uint32_t crc = 0) { return Crc32c(b, crc); }
uint32_t Crc(const std::string& s) { return Crc32c({reinterpret_cast<const uint8_t*>(s.data()), s.size()}); }

std::string ShardPrefix(const ShardKey& k) {
  char row[24];
  std::snprintf(row, sizeof(row), "%012" PRId64, k.row_begin);
  return k.checkpoint + "/" + k.tensor + "/" + row;
}
std::string HeaderKey(const ShardKey& k) { return "s/" + ShardPrefix(k); }
std::string ChunkKey(const ShardKey& k, uint32_t i) {
  char c[16];
  std::snprintf(c, sizeof(c), "/%06u", i);
  return "c/" + ShardPrefix(k) + c;
}
std::string Name(const ShardKey& k) {
  return "shard " + k.checkpoint + "/" + k.tensor + " rows@" + std::to_string(k.row_begin);
}

bool ValidName(const std::string& s) { return !s.empty() && s.find('/') == std::string::npos; }

}  // namespace

Expected<std::unique_ptr<ShardStore>> ShardStore::Open(const std::string& dir, std::string id) {
  rocksdb::Options opts = DefaultRocksDbOptions();
  // Shards are big, write-once values: a large memtable and no compression
  // (fp32 weights do not compress) keep the write path at disk speed.
  opts.write_buffer_size = 64 << 20;
  opts.compression = rocksdb::kNoCompression;
  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenRocksDb(dir, "shards", "shard store", opts));
  return std::unique_ptr<ShardStore>(new ShardStore(db.release(), std::move(id), dir + "/shards"));
}

ShardStore::~ShardStore() { delete db_; }

Expected<uint32_t> ShardStore::Put(const ShardKey& key, int64_t row_end, std::span<const uint8_t> bytes) {
  if (!ValidName(key.checkpoint) || !ValidName(key.tensor))
    return Status::InvalidArgument("shard store: bad shard name '" + key.checkpoint + "/" + key.tensor + "'");
  if (key.row_begin < 0 || row_end < key.row_begin)
    return Status::InvalidArgument("shard store: " + Name(key) + " has rows [" + std::to_string(key.row_begin) + ", " +
                                   std::to_string(row_end) + ")");
  ShardHeader h;
  h.row_end = row_end;
  h.bytes = bytes.size();
  h.crc32c = Crc(bytes);
  h.chunks = static_cast<uint32_t>((bytes.size() + kChunkBytes - 1) / kChunkBytes);
  // No write-ahead log: shard bytes would hit the disk twice (WAL, then the
  // table file). Sync() flushes the memtable instead, which writes and syncs
  // the table files; a crash before it loses only an uncommitted save.
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;
  for (uint32_t i = 0; i < h.chunks; ++i) {
    const size_t begin = static_cast<size_t>(i) * kChunkBytes;
    const auto part = bytes.subspan(begin, std::min(kChunkBytes, bytes.size() - begin));
    ChunkValue v{Crc(part), std::string(reinterpret_cast<const char*>(part.data()), part.size())};
    rocksdb::WriteBatch batch;
    batch.Put(ChunkKey(key, i), Encode(v));
    if (i + 1 == h.chunks) batch.Put(HeaderKey(key), Encode(h));
    rocksdb::Status s = db_->Write(wo, &batch);
    if (!s.ok()) return Status::IOError("shard store " + id_ + ": write of " + Name(key) + " failed: " + s.ToString());
  }
  if (h.chunks == 0) {
    rocksdb::Status s = db_->Put(wo, HeaderKey(key), Encode(h));
    if (!s.ok()) return Status::IOError("shard store " + id_ + ": write of " + Name(key) + " failed: " + s.ToString());
  }
  return h.crc32c;
}

Status ShardStore::Sync() {
  rocksdb::FlushOptions fo;
  fo.wait = true;
  rocksdb::Status s = db_->Flush(fo);
  if (!s.ok()) return Status::IOError("shard store " + id_ + ": sync failed: " + s.ToString());
  return Status::Ok();
}

Expected<std::vector<uint8_t>> ShardStore::Get(const ShardKey& key, uint32_t* crc32c) const {
  std::string raw;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), HeaderKey(key), &raw);
  if (s.IsNotFound()) return Status::NotFound("shard store " + id_ + ": no " + Name(key));
  if (!s.ok()) return Status::IOError("shard store " + id_ + ": read of " + Name(key) + " failed: " + s.ToString());
  ShardHeader h;
  // (bytes / kChunkBytes, rounded up, without the overflow of bytes + kChunkBytes - 1 on a damaged header)
  if (!Decode(raw, h) || h.version != 1 || h.chunks != h.bytes / kChunkBytes + (h.bytes % kChunkBytes != 0))
    return Status::Corruption("shard store " + id_ + ": " + Name(key) + " has a malformed header");
  std::vector<uint8_t> out;
  out.reserve(std::min<uint64_t>(h.bytes, kChunkBytes));  // grows with the verified chunks, never from a bad header
  for (uint32_t i = 0; i < h.chunks; ++i) {
    s = db_->Get(rocksdb::ReadOptions(), ChunkKey(key, i), &raw);
    if (s.IsNotFound())
      return Status::Corruption("shard store " + id_ + ": " + Name(key) + " lacks chunk " + std::to_string(i));
    if (!s.ok()) return Status::IOError("shard store " + id_ + ": read of " + Name(key) + " failed: " + s.ToString());
    ChunkValue v;
    if (!Decode(raw, v))
      return Status::Corruption("shard store " + id_ + ": " + Name(key) + " chunk " + std::to_string(i) +
                                " is malformed");
    if (Crc(v.bytes) != v.crc32c)
      return Status::Corruption("shard store " + id_ + ": " + Name(key) + " chunk " + std::to_string(i) +
                                " fails its CRC32C");
    out.insert(out.end(), v.bytes.begin(), v.bytes.end());
  }
  if (out.size() != h.bytes || Crc(out) != h.crc32c)
    return Status::Corruption("shard store " + id_ + ": " + Name(key) + " fails its CRC32C");
  if (crc32c) *crc32c = h.crc32c;
  return out;
}

Status ShardStore::Verify(const ShardKey& key) const { return Get(key).status(); }

Expected<std::vector<ShardInfo>> ShardStore::List(const std::string& checkpoint) const {
  std::vector<ShardInfo> out;
  const std::string prefix = checkpoint.empty() ? "s/" : "s/" + checkpoint + "/";
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    const std::string k = it->key().ToString().substr(2);  // <ckpt>/<tensor>/<row>
    const size_t a = k.find('/'), b = k.rfind('/');
    ShardHeader h;
    if (a == std::string::npos || b == a || !Decode(it->value().ToString(), h))
      return Status::Corruption("shard store " + id_ + ": malformed header under key '" + k + "'");
    ShardInfo info;
    info.key = {k.substr(0, a), k.substr(a + 1, b - a - 1), std::strtoll(k.c_str() + b + 1, nullptr, 10)};
    info.row_end = h.row_end;
    info.bytes = h.bytes;
    info.crc32c = h.crc32c;
    out.push_back(std::move(info));
  }
  if (!it->status().ok()) return Status::IOError("shard store " + id_ + ": listing failed: " + it->status().ToString());
  return out;
}

std::vector<std::string> ShardStore::Checkpoints() const {
  // Chunks count too: a save that crashed inside a multi-chunk shard leaves
  // chunks whose header was never written, and they must not leak.
  std::set<std::string> ids;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (const std::string kind : {"s/", "c/"}) {
    for (it->Seek(kind); it->Valid() && it->key().starts_with(kind);) {
      const std::string k = it->key().ToString().substr(2);
      const std::string id = k.substr(0, k.find('/'));
      ids.insert(id);
      it->Seek(kind + id + "0");  // '0' sorts right after '/': skip to the next id
    }
  }
  return std::vector<std::string>(ids.begin(), ids.end());
}

Status ShardStore::Drop(const std::string& checkpoint) {
  if (!ValidName(checkpoint)) return Status::InvalidArgument("shard store: bad checkpoint id '" + checkpoint + "'");
  rocksdb::WriteBatch batch;
  for (const char* kind : {"s/", "c/"}) {
    const std::string begin = kind + checkpoint + "/", end = kind + checkpoint + "0";
    batch.DeleteRange(begin, end);
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s = db_->Write(wo, &batch);
  if (!s.ok()) return Status::IOError("shard store " + id_ + ": drop of " + checkpoint + " failed: " + s.ToString());
  return Status::Ok();
}

Status ShardStore::CorruptForTest(const ShardKey& key) {
  std::string raw;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), ChunkKey(key, 0), &raw);
  if (!s.ok()) return Status::NotFound("shard store " + id_ + ": no chunk 0 of " + Name(key));
  raw[raw.size() / 2] ^= 0x10;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  s = db_->Put(wo, ChunkKey(key, 0), raw);
  return s.ok() ? Status::Ok() : Status::IOError(s.ToString());
}

}  // namespace troupe::ckpt
