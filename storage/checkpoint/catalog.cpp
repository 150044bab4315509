#include "storage/checkpoint/catalog.h"

#include <rocksdb/db.h>

#include <algorithm>
#include <cstdio>

#include "storage/rocksdb_open.h"

namespace troupe::ckpt {
namespace {

constexpr const char* kCounterKey = "next_seq";

rocksdb::WriteOptions Synced() {
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return wo;
}

bool ValidId(const std::string& id) {
  return id.size() == 11 && id.starts_with("ckpt-") && id.find_first_not_of("0123456789", 5) == std::string::npos;
}

Status CheckId(const std::string& id) {
  if (!ValidId(id)) return Status::InvalidArgument("checkpoint id '" + id + "' is not of the form ckpt-NNNNNN");
  return Status::Ok();
}

}  // namespace

Expected<std::unique_ptr<Catalog>> Catalog::Open(const std::string& dir) {
  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenRocksDb(dir, "catalog", "checkpoint catalog"));
  return std::unique_ptr<Catalog>(new Catalog(db.release()));
}

Expected<std::unique_ptr<Catalog>> Catalog::OpenReadOnly(const std::string& dir) {
  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenRocksDbReadOnly(dir, "catalog", "checkpoint catalog"));
  return std::unique_ptr<Catalog>(new Catalog(db.release()));
}

Catalog::~Catalog() { delete db_; }

Expected<std::string> Catalog::ReserveId() {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), kCounterKey, &v);
  uint64_t next = 1;
  if (s.ok()) {
    // The counter holds the next id, up to 1000000 once ckpt-999999 is taken.
    if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos || v.size() > 7)
      return Status::Corruption("checkpoint catalog: counter holds '" + v + "'");
    next = std::stoull(v);
  } else if (!s.IsNotFound()) {
    return Status::IOError("checkpoint catalog: read of the counter failed: " + s.ToString());
  }
  if (next > 999999) return Status::Internal("checkpoint catalog: ids exhausted");
  s = db_->Put(Synced(), kCounterKey, std::to_string(next + 1));
  if (!s.ok()) return Status::IOError("checkpoint catalog: write of the counter failed: " + s.ToString());
  char id[16];
  std::snprintf(id, sizeof(id), "ckpt-%06llu", static_cast<unsigned long long>(next));
  return std::string(id);
}

Status Catalog::Commit(const Manifest& m) {
  TROUPE_RETURN_IF_ERROR(CheckId(m.id));
  rocksdb::Status s = db_->Put(Synced(), "m/" + m.id, EncodeManifest(m));
  if (!s.ok()) return Status::IOError("checkpoint catalog: commit of " + m.id + " failed: " + s.ToString());
  return Status::Ok();
}

Expected<std::vector<Manifest>> Catalog::List() const {
  std::vector<Manifest> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek("m/"); it->Valid() && it->key().starts_with("m/"); it->Next()) {
    const std::string key = it->key().ToString();
    auto m = DecodeManifest(it->value().ToString());
    if (!m.ok()) return m.status().WithContext("catalog key '" + key + "'");
    if ("m/" + m->id != key)
      return Status::Corruption("checkpoint catalog: key " + key + " holds the manifest of " + m->id);
    out.push_back(std::move(m).value());
  }
  if (!it->status().ok()) return Status::IOError("checkpoint catalog: listing failed: " + it->status().ToString());
  return out;
}

Expected<Manifest> Catalog::Get(const std::string& id) const {
  TROUPE_RETURN_IF_ERROR(CheckId(id));
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), "m/" + id, &v);
  if (s.IsNotFound()) return Status::NotFound("no committed checkpoint " + id);
  if (!s.ok()) return Status::IOError("checkpoint catalog: read of " + id + " failed: " + s.ToString());
  auto m = DecodeManifest(v);
  if (!m.ok()) return m.status().WithContext("catalog key 'm/" + id + "'");
  if (m->id != id) return Status::Corruption("checkpoint catalog: key m/" + id + " holds the manifest of " + m->id);
  return m;
}

Expected<Manifest> Catalog::Latest() const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  it->SeekForPrev("m/\xff");
  if (!it->Valid() || !it->key().starts_with("m/")) return Status::NotFound("no committed checkpoint");
  return Get(it->key().ToString().substr(2));
}

Status Catalog::SetPinned(const std::string& id, bool pinned) {
  TROUPE_ASSIGN_OR_RETURN(Manifest m, Get(id));
  m.pinned = pinned;
  return Commit(m);
}

Status Catalog::Remove(const std::string& id) {
  TROUPE_RETURN_IF_ERROR(Get(id).status());
  rocksdb::Status s = db_->Delete(Synced(), "m/" + id);
  if (!s.ok()) return Status::IOError("checkpoint catalog: removal of " + id + " failed: " + s.ToString());
  return Status::Ok();
}

Expected<std::vector<std::string>> Catalog::Expired(const RetentionPolicy& policy) const {
  TROUPE_ASSIGN_OR_RETURN(std::vector<Manifest> all, List());
  std::vector<std::string> out;
  const size_t n = all.size();
  for (size_t i = 0; i < n; ++i) {
    const Manifest& m = all[i];
    const bool recent = policy.keep_last > 0 && i + static_cast<size_t>(policy.keep_last) >= n;
    const bool milestone = policy.keep_every > 0 && m.step % policy.keep_every == 0;
    if (!recent && !milestone && !m.pinned) out.push_back(m.id);
  }
  return out;
}

Status Catalog::PutRawForTest(const std::string& id, const std::string& bytes) {
  rocksdb::Status s = db_->Put(Synced(), "m/" + id, bytes);
  return s.ok() ? Status::Ok() : Status::IOError(s.ToString());
}

}  // namespace troupe::ckpt
