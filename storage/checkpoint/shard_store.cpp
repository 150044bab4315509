#include "storage/checkpoint/shard_store.h"

#include <fcntl.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cereal/archives/portable_binary.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

#include "common/crc32c.h"
#include "storage/rocksdb_open.h"

namespace troupe::ckpt {
namespace {

// ------------------------------------------------------------ on-disk format

// Format 1's chunk value: a RocksDB value under "c/<shard>/<chunk:06>" (read only).
struct ChunkValueV1 {
  uint32_t crc32c = 0;
  std::string bytes;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(crc32c, bytes);
  }
};

// The shard header under "s/<shard>", cereal portable binary. Both formats
// start with the version, so one struct reads either.
struct ShardHeader {
  uint32_t version = kShardFormatVersion;
  int64_t row_end = 0;
  uint64_t bytes = 0;
  uint32_t chunks = 0;
  uint32_t crc32c = 0;  // of all the shard's bytes
  // Format 2: the chunks lie back to back in the checkpoint's chunk file
  // from `offset` on, each chunk_bytes long but the last.
  uint32_t chunk_bytes = 0;
  uint64_t offset = 0;
  std::vector<uint32_t> chunk_crc32c;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(version);
    if (version == 1) ar(row_end, bytes, chunks, crc32c);
    if (version == 2) ar(row_end, bytes, chunks, crc32c, chunk_bytes, offset, chunk_crc32c);
  }
};

// The first 64 bytes of a chunk file (little-endian).
constexpr char kChunkFileMagic[8] = {'T', 'R', 'P', 'C', 'H', 'U', 'N', 'K'};
constexpr size_t kChunkFileHeaderBytes = 64;
struct ChunkFileHeader {
  char magic[8];
  uint32_t version;       // kShardFormatVersion
  uint32_t header_bytes;  // kChunkFileHeaderBytes
  uint32_t id_crc32c;     // CRC32C of the checkpoint id (the file belongs to that checkpoint)
  char id[44];            // the id, cut to fit and zero-padded (for people; id_crc32c is what is checked)
};
static_assert(sizeof(ChunkFileHeader) == kChunkFileHeaderBytes);

uint32_t Crc(std::span<const uint8_t> b, uint32_t crc = 0) { return Crc32c(b, crc); }
uint32_t Crc(const std::string& s) { return Crc32c({reinterpret_cast<const uint8_t*>(s.data()), s.size()}); }

ChunkFileHeader MakeChunkFileHeader(const std::string& checkpoint) {
  ChunkFileHeader h;
  std::memset(&h, 0, sizeof(h));
  std::memcpy(h.magic, kChunkFileMagic, sizeof(h.magic));
  h.version = kShardFormatVersion;
  h.header_bytes = kChunkFileHeaderBytes;
  h.id_crc32c = Crc(checkpoint);
  std::memcpy(h.id, checkpoint.data(), std::min(checkpoint.size(), sizeof(h.id)));
  return h;
}

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
  } catch (const std::length_error&) {
    return false;
  }
}

// (bytes / chunk, rounded up, without the overflow of bytes + chunk - 1 on a damaged header)
uint64_t ChunksOf(uint64_t bytes, uint64_t chunk) { return bytes / chunk + (bytes % chunk != 0); }

std::string ShardPrefix(const ShardKey& k) {
  char row[24];
  std::snprintf(row, sizeof(row), "%012" PRId64, k.row_begin);
  return k.checkpoint + "/" + k.tensor + "/" + row;
}
std::string HeaderKey(const ShardKey& k) { return "s/" + ShardPrefix(k); }
std::string ChunkKeyV1(const ShardKey& k, uint32_t i) {
  char c[16];
  std::snprintf(c, sizeof(c), "/%06u", i);
  return "c/" + ShardPrefix(k) + c;
}
std::string Name(const ShardKey& k) {
  return "shard " + k.checkpoint + "/" + k.tensor + " rows@" + std::to_string(k.row_begin);
}

bool ValidName(const std::string& s) { return !s.empty() && s.find('/') == std::string::npos; }

constexpr const char* kChunkFileSuffix = ".chunks";

std::string Errno(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

// pwrite/pread of all `n` bytes (they may return less, or be interrupted).
bool WriteAt(int fd, const uint8_t* p, size_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, std::min<size_t>(n, 1u << 30), static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return true;
}
bool ReadAt(int fd, uint8_t* p, size_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, std::min<size_t>(n, 1u << 30), static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      if (r == 0) errno = EIO;  // the file ends early
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return true;
}

Status SyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::IOError(Errno("cannot open", dir));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  errno = err;
  return rc == 0 ? Status::Ok() : Status::IOError(Errno("cannot sync", dir));
}

// Closes `fd` on every way out of a scope.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// Carry-less 32x32 matrix helpers of Crc32cCombine (zlib's gf2_matrix_*).
uint32_t Gf2Times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec != 0; vec >>= 1, ++mat)
    if (vec & 1) sum ^= *mat;
  return sum;
}
void Gf2Square(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = Gf2Times(mat, mat[n]);
}

}  // namespace

uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  if (len_b == 0) return crc_a;
  uint32_t even[32], odd[32];  // operators for 2^k zero bits
  odd[0] = 0x82F63B78;         // one zero bit: the reflected Castagnoli polynomial
  for (int n = 1, row = 1; n < 32; ++n, row <<= 1) odd[n] = static_cast<uint32_t>(row);
  Gf2Square(even, odd);  // two zero bits
  Gf2Square(odd, even);  // four zero bits
  // Apply len_b zero bytes to crc_a: the first square below gives one byte.
  do {
    Gf2Square(even, odd);
    if (len_b & 1) crc_a = Gf2Times(even, crc_a);
    len_b >>= 1;
    if (len_b == 0) break;
    Gf2Square(odd, even);
    if (len_b & 1) crc_a = Gf2Times(odd, crc_a);
    len_b >>= 1;
  } while (len_b != 0);
  return crc_a ^ crc_b;
}

// ------------------------------------------------------------------ ShardStore

ShardStore::ShardStore(rocksdb::DB* db, std::string id, std::string dir)
    : db_(db), id_(std::move(id)), path_(dir + "/shards"), chunks_dir_(dir + "/chunks") {}

Expected<std::unique_ptr<ShardStore>> ShardStore::Open(const std::string& dir, std::string id) {
  // The index holds small values only (headers): RocksDB's defaults suit it.
  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenRocksDb(dir, "shards", "shard store"));
  const std::string chunks = dir + "/chunks";
  std::error_code ec;
  if (std::filesystem::create_directory(chunks, ec)) TROUPE_RETURN_IF_ERROR(SyncDir(dir));
  if (ec) return Status::IOError("shard store: cannot create " + chunks + ": " + ec.message());
  return std::unique_ptr<ShardStore>(new ShardStore(db.release(), std::move(id), dir));
}

Expected<std::unique_ptr<ShardStore>> ShardStore::OpenReadOnly(const std::string& dir, std::string id) {
  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenRocksDbReadOnly(dir, "shards", "shard store"));
  std::unique_ptr<ShardStore> store(new ShardStore(db.release(), std::move(id), dir));
  store->read_only_ = true;
  return store;
}

Status ShardStore::RefuseIfReadOnly(const char* what) const {
  if (!read_only_) return Status::Ok();
  return Status::InvalidArgument("shard store " + id_ + " is open for reading only: " + what + " refused");
}

ShardStore::~ShardStore() {
  CloseChunkFiles();
  delete db_;
}

std::string ShardStore::ChunkFilePath(const std::string& checkpoint) const {
  return chunks_dir_ + "/" + checkpoint + kChunkFileSuffix;
}

Expected<ShardStore::ChunkFile*> ShardStore::OpenChunkFile(const std::string& checkpoint) {
  auto it = files_.find(checkpoint);
  if (it != files_.end()) return &it->second;
  const std::string path = ChunkFilePath(checkpoint);
  ChunkFile f;
  f.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (f.fd < 0) return Status::IOError("shard store " + id_ + ": " + Errno("cannot open", path));
  struct stat st;
  if (::fstat(f.fd, &st) != 0) {
    const Status s = Status::IOError("shard store " + id_ + ": " + Errno("cannot stat", path));
    ::close(f.fd);
    return s;
  }
  f.end = static_cast<uint64_t>(st.st_size);
  if (f.end < kChunkFileHeaderBytes) {  // new (or cut short by a crash before its first chunk)
    const ChunkFileHeader h = MakeChunkFileHeader(checkpoint);
    if (!WriteAt(f.fd, reinterpret_cast<const uint8_t*>(&h), sizeof(h), 0)) {
      const Status s = Status::IOError("shard store " + id_ + ": " + Errno("cannot write", path));
      ::close(f.fd);
      return s;
    }
    f.end = kChunkFileHeaderBytes;
    f.created = true;
  }
  return &files_.emplace(checkpoint, f).first->second;
}

void ShardStore::CloseChunkFiles() {
  for (auto& [id, f] : files_) ::close(f.fd);
  files_.clear();
}

Expected<uint32_t> ShardStore::Put(const ShardKey& key, int64_t row_end, std::span<const uint8_t> bytes) {
  TROUPE_RETURN_IF_ERROR(RefuseIfReadOnly("a write"));
  if (!ValidName(key.checkpoint) || !ValidName(key.tensor))
    return Status::InvalidArgument("shard store: bad shard name '" + key.checkpoint + "/" + key.tensor + "'");
  if (key.row_begin < 0 || row_end < key.row_begin)
    return Status::InvalidArgument("shard store: " + Name(key) + " has rows [" + std::to_string(key.row_begin) + ", " +
                                   std::to_string(row_end) + ")");
  ShardHeader h;
  h.row_end = row_end;
  h.bytes = bytes.size();
  h.chunk_bytes = kChunkBytes;
  h.chunks = static_cast<uint32_t>(ChunksOf(bytes.size(), kChunkBytes));
  h.chunk_crc32c.resize(h.chunks);
  if (h.chunks > 0) {
    // Reserve the shard's range of the chunk file; the writes themselves
    // run unlocked, so shards of one checkpoint are written in parallel.
    int fd = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      TROUPE_ASSIGN_OR_RETURN(ChunkFile * f, OpenChunkFile(key.checkpoint));
      fd = f->fd;
      h.offset = f->end;
      f->end += bytes.size();
    }
    // Each chunk is hashed right before it is written, while it is in cache;
    // the shard's CRC comes from the chunks' (every byte is read once).
    for (uint32_t i = 0; i < h.chunks; ++i) {
      const size_t begin = static_cast<size_t>(i) * kChunkBytes;
      const auto part = bytes.subspan(begin, std::min(kChunkBytes, bytes.size() - begin));
      h.chunk_crc32c[i] = Crc(part);
      h.crc32c = Crc32cCombine(h.crc32c, h.chunk_crc32c[i], part.size());
      if (!WriteAt(fd, part.data(), part.size(), h.offset + begin))
        return Status::IOError("shard store " + id_ + ": write of " + Name(key) +
                               " failed: " + Errno("cannot write", ChunkFilePath(key.checkpoint)));
    }
  }
  // No write-ahead log: Sync() flushes the memtable instead, after the
  // chunk files are synced (see the file comment).
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;
  rocksdb::Status s = db_->Put(wo, HeaderKey(key), Encode(h));
  if (!s.ok()) return Status::IOError("shard store " + id_ + ": write of " + Name(key) + " failed: " + s.ToString());
  return h.crc32c;
}

Status ShardStore::Sync() {
  TROUPE_RETURN_IF_ERROR(RefuseIfReadOnly("a sync"));
  {
    std::lock_guard<std::mutex> lock(mu_);
    bool created = false;
    for (auto& [id, f] : files_) {
      if (::fdatasync(f.fd) != 0)
        return Status::IOError("shard store " + id_ + ": sync failed: " + Errno("cannot sync", ChunkFilePath(id)));
      created |= f.created;
    }
    if (created) TROUPE_RETURN_IF_ERROR(SyncDir(chunks_dir_).WithContext("shard store " + id_ + ": sync failed"));
    CloseChunkFiles();
  }
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
  const std::string where = "shard store " + id_ + ": " + Name(key);
  ShardHeader h;
  if (!Decode(raw, h)) return Status::Corruption(where + " has a malformed header");
  if (h.version != 1 && h.version != 2)
    return Status::Corruption(where + " has shard format version " + std::to_string(h.version) +
                              "; this build reads versions 1 and 2 (written by a newer troupe?)");
  std::vector<uint8_t> out;
  uint32_t crc = 0;
  if (h.version == 1) {
    if (h.chunks != ChunksOf(h.bytes, kChunkBytes)) return Status::Corruption(where + " has a malformed header");
    out.reserve(std::min<uint64_t>(h.bytes, kChunkBytes));  // grows with the verified chunks, never from a bad header
    for (uint32_t i = 0; i < h.chunks; ++i) {
      s = db_->Get(rocksdb::ReadOptions(), ChunkKeyV1(key, i), &raw);
      if (s.IsNotFound()) return Status::Corruption(where + " lacks chunk " + std::to_string(i));
      if (!s.ok()) return Status::IOError("shard store " + id_ + ": read of " + Name(key) + " failed: " + s.ToString());
      ChunkValueV1 v;
      if (!Decode(raw, v)) return Status::Corruption(where + " chunk " + std::to_string(i) + " is malformed");
      if (Crc(v.bytes) != v.crc32c)
        return Status::Corruption(where + " chunk " + std::to_string(i) + " fails its CRC32C");
      out.insert(out.end(), v.bytes.begin(), v.bytes.end());
    }
    crc = Crc(out);
  } else {
    if (h.chunk_bytes == 0 || h.chunks != ChunksOf(h.bytes, h.chunk_bytes) || h.chunk_crc32c.size() != h.chunks ||
        (h.chunks > 0 && h.offset < kChunkFileHeaderBytes))
      return Status::Corruption(where + " has a malformed header");
    if (h.chunks > 0) {
      const std::string path = ChunkFilePath(key.checkpoint);
      FdCloser file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
      if (file.fd < 0 && errno == ENOENT) return Status::Corruption(where + ": its chunk file " + path + " is missing");
      if (file.fd < 0) return Status::IOError(where + ": " + Errno("cannot open", path));
      ChunkFileHeader fh;
      struct stat st;
      if (!ReadAt(file.fd, reinterpret_cast<uint8_t*>(&fh), sizeof(fh), 0) || ::fstat(file.fd, &st) != 0)
        return Status::Corruption(where + ": its chunk file " + path + " is unreadable: " + std::strerror(errno));
      if (std::memcmp(fh.magic, kChunkFileMagic, sizeof(fh.magic)) != 0 || fh.version != kShardFormatVersion ||
          fh.header_bytes != kChunkFileHeaderBytes || fh.id_crc32c != Crc(key.checkpoint))
        return Status::Corruption(where + ": " + path + " is not a version 2 chunk file of " + key.checkpoint);
      const uint64_t size = static_cast<uint64_t>(st.st_size);
      if (h.offset > size || h.bytes > size - h.offset)  // checked before allocating h.bytes
        return Status::Corruption(where + ": its chunks lie past the end of " + path);
      out.resize(h.bytes);
      for (uint32_t i = 0; i < h.chunks; ++i) {
        const size_t begin = static_cast<size_t>(i) * h.chunk_bytes;
        const size_t n = std::min<uint64_t>(h.chunk_bytes, h.bytes - begin);
        if (!ReadAt(file.fd, out.data() + begin, n, h.offset + begin))
          return Status::IOError(where + ": " + Errno("cannot read chunk " + std::to_string(i) + " of", path));
        const uint32_t c = Crc(std::span<const uint8_t>(out).subspan(begin, n));
        if (c != h.chunk_crc32c[i])
          return Status::Corruption(where + " chunk " + std::to_string(i) + " fails its CRC32C");
        crc = Crc32cCombine(crc, c, n);
      }
    }
  }
  if (out.size() != h.bytes || crc != h.crc32c) return Status::Corruption(where + " fails its CRC32C");
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
    if (a == std::string::npos || b == a || !Decode(it->value().ToString(), h) || (h.version != 1 && h.version != 2))
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
  // Chunks count too: a save that crashed before a shard's header was
  // written leaves chunks (in its chunk file, or as format 1 "c/" keys)
  // that must not leak.
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
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(chunks_dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() > std::strlen(kChunkFileSuffix) && name.ends_with(kChunkFileSuffix))
      ids.insert(name.substr(0, name.size() - std::strlen(kChunkFileSuffix)));
  }
  return std::vector<std::string>(ids.begin(), ids.end());
}

Status ShardStore::Drop(const std::string& checkpoint) {
  TROUPE_RETURN_IF_ERROR(RefuseIfReadOnly("a drop"));
  if (!ValidName(checkpoint)) return Status::InvalidArgument("shard store: bad checkpoint id '" + checkpoint + "'");
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(checkpoint);
    if (it != files_.end()) {
      ::close(it->second.fd);
      files_.erase(it);
    }
  }
  // Headers first (synced), then the bytes: a crash in between leaves a
  // chunk file without headers, which Checkpoints() still reports.
  rocksdb::WriteBatch batch;
  for (const char* kind : {"s/", "c/"}) {
    const std::string begin = kind + checkpoint + "/", end = kind + checkpoint + "0";
    batch.DeleteRange(begin, end);
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s = db_->Write(wo, &batch);
  if (!s.ok()) return Status::IOError("shard store " + id_ + ": drop of " + checkpoint + " failed: " + s.ToString());
  const std::string path = ChunkFilePath(checkpoint);
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Status::IOError("shard store " + id_ + ": drop of " + checkpoint +
                           " failed: " + Errno("cannot remove", path));
  }
  return SyncDir(chunks_dir_).WithContext("shard store " + id_ + ": drop of " + checkpoint);
}

Status ShardStore::CorruptForTest(const ShardKey& key) {
  std::string raw;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), HeaderKey(key), &raw);
  ShardHeader h;
  if (!s.ok() || !Decode(raw, h)) return Status::NotFound("shard store " + id_ + ": no header of " + Name(key));
  if (h.version == 1) {  // the chunk's RocksDB value
    s = db_->Get(rocksdb::ReadOptions(), ChunkKeyV1(key, 0), &raw);
    if (!s.ok()) return Status::NotFound("shard store " + id_ + ": no chunk 0 of " + Name(key));
    raw[raw.size() / 2] ^= 0x10;
    rocksdb::WriteOptions wo;
    wo.sync = true;
    s = db_->Put(wo, ChunkKeyV1(key, 0), raw);
    return s.ok() ? Status::Ok() : Status::IOError(s.ToString());
  }
  if (h.chunks == 0 || h.bytes == 0) return Status::NotFound("shard store " + id_ + ": no chunk 0 of " + Name(key));
  const std::string path = ChunkFilePath(key.checkpoint);
  FdCloser file{::open(path.c_str(), O_RDWR | O_CLOEXEC)};
  if (file.fd < 0) return Status::IOError(Errno("cannot open", path));
  const uint64_t at = h.offset + std::min<uint64_t>(h.bytes, h.chunk_bytes) / 2;
  uint8_t b = 0;
  if (!ReadAt(file.fd, &b, 1, at)) return Status::IOError(Errno("cannot read", path));
  b ^= 0x10;
  if (!WriteAt(file.fd, &b, 1, at) || ::fsync(file.fd) != 0) return Status::IOError(Errno("cannot write", path));
  return Status::Ok();
}

}  // namespace troupe::ckpt
