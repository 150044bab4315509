#include "storage/checkpoint/checkpoint_io.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <thread>
#include <tuple>

#include "common/crc32c.h"

namespace troupe::ckpt {
namespace {

std::string TensorWhere(const std::string& checkpoint, const std::string& tensor) {
  return "checkpoint " + checkpoint + " tensor " + tensor;
}

// One store's copy of a shard, checked against its manifest entry: sound on
// its own is not enough, it must be the copy the manifest names.
Expected<std::vector<uint8_t>> ReadCopy(const ShardStore& store, const std::string& checkpoint,
                                        const TensorRecord& tensor, const ShardRef& ref) {
  uint32_t crc = 0;
  auto bytes = store.Get({checkpoint, tensor.name, ref.row_begin}, &crc);
  if (bytes.ok() &&
      (crc != ref.crc32c || static_cast<int64_t>(bytes->size()) != (ref.row_end - ref.row_begin) * tensor.row_bytes()))
    return Status::Corruption("store " + store.id() + ": shard " + checkpoint + "/" + tensor.name + " rows@" +
                              std::to_string(ref.row_begin) + " differs from its manifest entry");
  return bytes;
}

Status CheckSaveOptions(const StoreSet& stores, const SaveOptions& options) {
  if (stores.empty()) return Status::InvalidArgument("checkpoint save: no shard store");
  if (options.replication < 1 || options.replication > static_cast<int>(stores.size()))
    return Status::InvalidArgument("checkpoint save: replication " + std::to_string(options.replication) +
                                   " needs that many stores, there are " + std::to_string(stores.size()));
  if (options.shards_per_tensor < 1) return Status::InvalidArgument("checkpoint save: shards_per_tensor < 1");
  if (options.threads < 1) return Status::InvalidArgument("checkpoint save: threads < 1");
  return Status::Ok();
}

Status CheckName(const std::string& what, const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos)
    return Status::InvalidArgument("checkpoint save: bad " + what + " '" + name + "'");
  return Status::Ok();
}

Status CheckSnapshot(const Snapshot& snap) {
  // Check every tensor before anything is written: two tensors of one name
  // would overwrite each other's shards and commit a checkpoint that can
  // never load; a bad name or size would fail half-way through the save.
  std::set<std::string> names;
  for (const HostTensor& t : snap.tensors) {
    TROUPE_RETURN_IF_ERROR(CheckName("tensor name", t.name));
    if (!names.insert(t.name).second) return Status::InvalidArgument("checkpoint save: two tensors named " + t.name);
    int64_t elems = 1;
    bool negative = false;
    for (int64_t d : t.shape) {
      negative |= d < 0;
      elems *= d;
    }
    const size_t size = t.data().size();
    if (negative || (elems > 0 && size % static_cast<size_t>(elems) != 0) || (elems == 0 && size != 0))
      return Status::InvalidArgument("checkpoint save: tensor " + t.name + " has " + std::to_string(size) +
                                     " bytes for its shape");
  }
  return Status::Ok();
}

// One shard copy to write: the `shard`-th shard of tensor `tensor`.
struct Write {
  size_t tensor, shard;
  ShardStore* store;
  std::span<const uint8_t> bytes;
  uint32_t crc32c = 0;
};

// `threads` workers take the next write until none is left or one fails;
// each write's CRC32C lands in it.
template <typename PutFn>
Status RunWrites(std::vector<Write>& writes, int threads, const PutFn& put) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  Status error;
  auto work = [&] {
    for (size_t i; !failed.load() && (i = next.fetch_add(1)) < writes.size();) {
      Expected<uint32_t> crc = put(writes[i]);
      if (crc.ok()) {
        writes[i].crc32c = *crc;
        continue;
      }
      std::lock_guard<std::mutex> lock(error_mu);
      if (!failed.exchange(true)) error = crc.status();
    }
  };
  std::vector<std::thread> helpers;
  const size_t n = std::min<size_t>(std::max(threads, 1), std::max<size_t>(writes.size(), 1));
  for (size_t k = 1; k < n; ++k) helpers.emplace_back(work);
  work();
  for (std::thread& h : helpers) h.join();
  return failed ? error : Status::Ok();
}

}  // namespace

int64_t HostTensor::rows() const { return RowsOf(shape); }

uint64_t Snapshot::TotalBytes() const {
  uint64_t b = 0;
  for (const HostTensor& t : tensors) b += t.data().size();
  return b;
}

Expected<Manifest> WriteShards(const Snapshot& snap, const std::string& id, const StoreSet& stores,
                               const SaveOptions& options) {
  TROUPE_RETURN_IF_ERROR(CheckSaveOptions(stores, options));
  std::vector<ShardStore*> ring;
  for (const auto& [id, s] : stores) {
    if (s == nullptr) return Status::InvalidArgument("checkpoint save: store " + id + " is null");
    ring.push_back(s);
  }
  TROUPE_RETURN_IF_ERROR(CheckSnapshot(snap));
  TROUPE_RETURN_IF_ERROR(CheckName("checkpoint id", id));
  TROUPE_RETURN_IF_ERROR(snap.WaitReady().WithContext("checkpoint save " + id + ": capture"));
  Manifest m = NewManifest(snap, id, options.replication);

  // Plan: every shard's row range and stores (round-robin start, so shards
  // spread over the stores), and one write per shard copy.
  std::vector<Write> writes;
  std::set<ShardStore*> used;
  size_t placement = 0;
  for (size_t ti = 0; ti < snap.tensors.size(); ++ti) {
    const HostTensor& t = snap.tensors[ti];
    TensorRecord rec;
    rec.name = t.name;
    rec.dtype = t.dtype;
    rec.shape = t.shape;
    rec.bytes = t.data().size();
    const int64_t rows = t.rows();
    const int64_t row_bytes = rows == 0 ? 0 : static_cast<int64_t>(t.data().size()) / rows;
    const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(options.shards_per_tensor, rows));
    for (int64_t p = 0; p < pieces && rows > 0; ++p) {
      ShardRef ref;
      ref.row_begin = rows * p / pieces;
      ref.row_end = rows * (p + 1) / pieces;
      const auto bytes = t.data().subspan(ref.row_begin * row_bytes, (ref.row_end - ref.row_begin) * row_bytes);
      for (int r = 0; r < options.replication; ++r) {
        ShardStore* st = ring[(placement + r) % ring.size()];
        writes.push_back({ti, rec.shards.size(), st, bytes});
        ref.stores.push_back(st->id());
        used.insert(st);
      }
      ++placement;
      rec.shards.push_back(std::move(ref));
    }
    m.tensors.push_back(std::move(rec));
  }

  auto fail = [&](const Status& s) {
    for (ShardStore* st : used) (void)st->Drop(id);  // best effort: GC would get them anyway
    return s;
  };
  Status written = RunWrites(writes, options.threads, [&](const Write& w) {
    const ShardRef& ref = m.tensors[w.tensor].shards[w.shard];
    return w.store->Put({id, snap.tensors[w.tensor].name, ref.row_begin}, ref.row_end, w.bytes);
  });
  if (!written.ok()) return fail(written.WithContext("checkpoint save " + id));

  // Checksums: each shard's from its writes (every copy must agree), each
  // tensor's from its shards', which cover its bytes in row order.
  for (const Write& w : writes) {
    ShardRef& ref = m.tensors[w.tensor].shards[w.shard];
    if (w.store->id() == ref.stores.front()) {
      ref.crc32c = w.crc32c;
    } else if (w.crc32c != ref.crc32c) {
      return fail(Status::Internal("checkpoint save " + id + ": the copies of a shard of " + m.tensors[w.tensor].name +
                                   " hash differently"));
    }
  }
  for (TensorRecord& rec : m.tensors) {
    const int64_t row_bytes = rec.row_bytes();
    for (const ShardRef& ref : rec.shards)
      rec.crc32c =
          Crc32cCombine(rec.crc32c, ref.crc32c, static_cast<uint64_t>((ref.row_end - ref.row_begin) * row_bytes));
  }

  for (ShardStore* st : used) {
    Status s = st->Sync();
    if (!s.ok()) return fail(s.WithContext("checkpoint save " + id));
  }
  return m;
}

Expected<Manifest> SaveCheckpoint(const Snapshot& snap, const StoreSet& stores, Catalog& catalog,
                                  const SaveOptions& options) {
  // Bad requests are refused before an id is spent.
  TROUPE_RETURN_IF_ERROR(CheckSaveOptions(stores, options));
  TROUPE_RETURN_IF_ERROR(CheckSnapshot(snap));
  TROUPE_ASSIGN_OR_RETURN(std::string id, catalog.ReserveId());
  TROUPE_ASSIGN_OR_RETURN(Manifest m, WriteShards(snap, id, stores, options));
  // A failed commit may still have reached the disk (e.g. the write landed,
  // the sync reported an error): dropping the shards then could leave a
  // committed manifest without its shards. Leave them; CollectGarbage() drops
  // them if the manifest really is not there.
  TROUPE_RETURN_IF_ERROR(catalog.Commit(m).WithContext("checkpoint save " + id));
  return m;
}

Expected<std::vector<PieceRecord>> WritePieces(const std::vector<HostPiece>& pieces, const std::string& id,
                                               ShardStore& store, int threads) {
  TROUPE_RETURN_IF_ERROR(CheckName("checkpoint id", id));
  std::vector<PieceRecord> out;
  std::vector<Write> writes;
  std::set<std::pair<std::string, int64_t>> keys;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const HostPiece& p = pieces[i];
    TROUPE_RETURN_IF_ERROR(CheckName("tensor name", p.name));
    int64_t elems = 1;
    for (int64_t d : p.shape) {
      if (d < 0) return Status::InvalidArgument("checkpoint save: tensor " + p.name + " has a negative dimension");
      elems *= d;
    }
    const int64_t rows = RowsOf(p.shape), piece_rows = p.row_end - p.row_begin;
    const int64_t row_elems = rows > 0 ? elems / rows : 0;
    const int64_t row_bytes = piece_rows > 0 ? static_cast<int64_t>(p.bytes.size()) / piece_rows : 0;
    if (p.row_begin < 0 || piece_rows <= 0 || p.row_end > rows ||
        row_bytes * piece_rows != static_cast<int64_t>(p.bytes.size()) || row_elems == 0 || row_bytes % row_elems)
      return Status::InvalidArgument("checkpoint save: a piece of " + p.name + " (" + std::to_string(p.bytes.size()) +
                                     " bytes for rows [" + std::to_string(p.row_begin) + ", " +
                                     std::to_string(p.row_end) + ")) is not whole rows inside its " +
                                     std::to_string(rows) + " rows");
    if (!keys.insert({p.name, p.row_begin}).second)
      return Status::InvalidArgument("checkpoint save: two pieces of " + p.name + " at row " +
                                     std::to_string(p.row_begin));
    PieceRecord r{p.name, p.dtype, p.shape, row_bytes, {}};
    r.shard.row_begin = p.row_begin;
    r.shard.row_end = p.row_end;
    r.shard.stores = {store.id()};
    out.push_back(std::move(r));
    writes.push_back({i, 0, &store, p.bytes});
  }
  Status written = RunWrites(writes, threads, [&](const Write& w) {
    const PieceRecord& r = out[w.tensor];
    return store.Put({id, r.name, r.shard.row_begin}, r.shard.row_end, w.bytes);
  });
  if (written.ok()) written = store.Sync();
  if (!written.ok()) {
    (void)store.Drop(id);  // best effort: a later garbage collection drops them too
    return written.WithContext("checkpoint save " + id);
  }
  for (const Write& w : writes) out[w.tensor].shard.crc32c = w.crc32c;
  return out;
}

Expected<std::vector<TensorRecord>> AssembleTensors(std::vector<PieceRecord> pieces,
                                                    const std::vector<std::string>& order) {
  std::map<std::string, std::vector<PieceRecord>> by_name;
  for (PieceRecord& p : pieces) by_name[p.name].push_back(std::move(p));
  std::vector<TensorRecord> out;
  for (const std::string& name : order) {
    auto it = by_name.find(name);
    if (it == by_name.end()) return Status::Corruption("checkpoint assembly: no writer reported tensor " + name);
    std::vector<PieceRecord> parts;
    std::sort(it->second.begin(), it->second.end(), [](const PieceRecord& a, const PieceRecord& b) {
      return std::tie(a.shard.row_begin, a.shard.row_end) < std::tie(b.shard.row_begin, b.shard.row_end);
    });
    // Pieces of the same rows are copies of one shard on other stores.
    for (PieceRecord& p : it->second) {
      if (!parts.empty() && parts.back().shard.row_begin == p.shard.row_begin &&
          parts.back().shard.row_end == p.shard.row_end) {
        if (parts.back().shard.crc32c != p.shard.crc32c || parts.back().row_bytes != p.row_bytes)
          return Status::Corruption("checkpoint assembly: two copies of " + name + " rows@" +
                                    std::to_string(p.shard.row_begin) + " differ");
        for (std::string& st : p.shard.stores) parts.back().shard.stores.push_back(std::move(st));
        continue;
      }
      parts.push_back(std::move(p));
    }
    TensorRecord t;
    t.name = name;
    t.dtype = parts.front().dtype;
    t.shape = parts.front().shape;
    const int64_t row_bytes = parts.front().row_bytes;
    t.bytes = static_cast<uint64_t>(t.rows() * row_bytes);
    int64_t next_row = 0;
    for (PieceRecord& p : parts) {
      if (p.dtype != t.dtype || p.shape != t.shape || p.row_bytes != row_bytes)
        return Status::Corruption("checkpoint assembly: the pieces of " + name + " disagree on its dtype or shape");
      if (p.shard.row_begin != next_row)
        return Status::Corruption("checkpoint assembly: tensor " + name + " has " +
                                  (p.shard.row_begin < next_row ? "overlapping pieces" : "no piece") + " at row " +
                                  std::to_string(std::min(p.shard.row_begin, next_row)));
      next_row = p.shard.row_end;
      t.crc32c = Crc32cCombine(t.crc32c, p.shard.crc32c,
                               static_cast<uint64_t>((p.shard.row_end - p.shard.row_begin) * row_bytes));
      t.shards.push_back(std::move(p.shard));
    }
    if (next_row != t.rows())
      return Status::Corruption("checkpoint assembly: tensor " + name + " has no piece at row " +
                                std::to_string(next_row));
    out.push_back(std::move(t));
    by_name.erase(it);
  }
  if (!by_name.empty())
    return Status::Corruption("checkpoint assembly: tensor " + by_name.begin()->first + " is not in the model");
  return out;
}

Expected<std::vector<uint8_t>> ReadRows(const TensorRecord& tensor, const std::string& checkpoint, int64_t row_begin,
                                        int64_t row_end, const StoreSet& stores, ReadStats* stats) {
  const std::string where = TensorWhere(checkpoint, tensor.name);
  if (row_begin < 0 || row_end < row_begin || row_end > tensor.rows())
    return Status::InvalidArgument(where + ": rows [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                                   ") outside its " + std::to_string(tensor.rows()) + " rows");
  const int64_t row_bytes = tensor.row_bytes();
  std::vector<uint8_t> out;
  out.reserve((row_end - row_begin) * row_bytes);
  for (const ShardRef& ref : tensor.shards) {
    if (ref.row_end <= row_begin || ref.row_begin >= row_end) continue;
    Expected<std::vector<uint8_t>> bytes =
        Status::NotFound(where + ": no store keeps rows@" + std::to_string(ref.row_begin));
    bool first = true;
    for (const std::string& store_id : ref.stores) {
      auto it = stores.find(store_id);
      if (it == stores.end()) {
        bytes = Status::NotFound(where + ": store " + store_id + " is not available");
      } else {
        bytes = ReadCopy(*it->second, checkpoint, tensor, ref);
      }
      if (bytes.ok()) {
        if (!first && stats) ++stats->replica_fallbacks;
        break;
      }
      if (stats) stats->failures.push_back(bytes.status().message());
      first = false;
    }
    if (!bytes.ok())
      return bytes.status().WithContext(where + ": every copy of rows@" + std::to_string(ref.row_begin) +
                                        " failed; last error");
    if (stats) ++stats->shards_read;
    const int64_t lo = std::max(row_begin, ref.row_begin), hi = std::min(row_end, ref.row_end);
    const auto first_byte = bytes->begin() + (lo - ref.row_begin) * row_bytes;
    out.insert(out.end(), first_byte, first_byte + (hi - lo) * row_bytes);
  }
  if (static_cast<int64_t>(out.size()) != (row_end - row_begin) * row_bytes)  // shards with a gap
    return Status::Corruption(where + ": its shards do not cover rows [" + std::to_string(row_begin) + ", " +
                              std::to_string(row_end) + ")");
  return out;
}

Expected<Snapshot> LoadCheckpoint(const Manifest& m, const StoreSet& stores, ReadStats* stats) {
  Snapshot snap;
  static_cast<RunState&>(snap) = m;
  for (const TensorRecord& t : m.tensors) {
    HostTensor h;
    h.name = t.name;
    h.dtype = t.dtype;
    h.shape = t.shape;
    TROUPE_ASSIGN_OR_RETURN(h.bytes, ReadRows(t, m.id, 0, t.rows(), stores, stats));
    if (h.bytes.size() != t.bytes || Crc32c(h.bytes) != t.crc32c)
      return Status::Corruption(TensorWhere(m.id, t.name) + ": assembled bytes fail the tensor's CRC32C");
    snap.tensors.push_back(std::move(h));
  }
  return snap;
}

Status VerifyCheckpoint(const Manifest& m, const StoreSet& stores, std::vector<std::string>* problems) {
  int unreadable = 0;
  for (const TensorRecord& t : m.tensors) {
    for (const ShardRef& ref : t.shards) {
      int good = 0;
      for (const std::string& store_id : ref.stores) {
        auto it = stores.find(store_id);
        Status s;
        if (it == stores.end()) {
          s = Status::NotFound("checkpoint " + m.id + ": store " + store_id + " is not available");
        } else {
          s = ReadCopy(*it->second, m.id, t, ref).status();
        }
        if (s.ok()) {
          ++good;
        } else if (problems) {
          problems->push_back(s.message());
        }
      }
      if (good == 0) ++unreadable;
    }
  }
  if (unreadable > 0)
    return Status::Corruption("checkpoint " + m.id + ": " + std::to_string(unreadable) +
                              " shard(s) have no good copy left");
  return Status::Ok();
}

Expected<std::vector<std::string>> CollectGarbage(Catalog& catalog, const StoreSet& stores,
                                                  const RetentionPolicy& policy, const std::string& keep) {
  TROUPE_ASSIGN_OR_RETURN(std::vector<std::string> expired, catalog.Expired(policy));
  for (const std::string& id : expired) TROUPE_RETURN_IF_ERROR(catalog.Remove(id));
  TROUPE_ASSIGN_OR_RETURN(std::vector<Manifest> live, catalog.List());
  std::set<std::string> alive = {keep};
  for (const Manifest& m : live) alive.insert(m.id);
  std::set<std::string> dropped(expired.begin(), expired.end());
  for (const auto& [sid, store] : stores) {
    for (const std::string& id : store->Checkpoints()) {
      if (alive.count(id)) continue;
      TROUPE_RETURN_IF_ERROR(store->Drop(id));
      dropped.insert(id);
    }
  }
  return std::vector<std::string>(dropped.begin(), dropped.end());
}

StagingPool& StagingPool::Shared() {
  static StagingPool pool;
  return pool;
}

std::vector<uint8_t> StagingPool::Take(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it != free_.end()) {
      std::vector<uint8_t> b = std::move(it->second);
      free_.erase(it);
      kept_ -= b.size();
      return b;
    }
  }
  return std::vector<uint8_t>(bytes);
}

void StagingPool::Recycle(Snapshot&& snap) {
  std::vector<std::vector<uint8_t>> buffers;
  for (HostTensor& t : snap.tensors)
    if (!t.bytes.empty()) buffers.push_back(std::move(t.bytes));
  snap = {};
  Recycle(std::move(buffers));
}

void StagingPool::Recycle(std::vector<std::vector<uint8_t>>&& buffers) {
  std::multimap<size_t, std::vector<uint8_t>> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    old.swap(free_);
    kept_ = 0;
    for (std::vector<uint8_t>& b : buffers) {
      kept_ += b.size();
      free_.emplace(b.size(), std::move(b));
    }
  }
  buffers.clear();
}  // `old` is freed here, outside the lock

void StagingPool::Clear() {
  std::multimap<size_t, std::vector<uint8_t>> old;
  std::lock_guard<std::mutex> lock(mu_);
  old.swap(free_);
  kept_ = 0;
}

uint64_t StagingPool::bytes_kept() const {
  std::lock_guard<std::mutex> lock(mu_);
  return kept_;
}

}  // namespace troupe::ckpt
