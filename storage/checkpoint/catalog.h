// Catalog: the committed checkpoints, in RocksDB under <dir>/catalog (the
// coordinator's, or the trainer's own for `troupe train`).
//
// A checkpoint exists for readers only once Commit() has written its
// manifest (synced): shards written under a reserved id whose manifest never
// arrives are garbage, never a checkpoint. Ids come from a durable counter
// ("ckpt-000001", "ckpt-000002", ...) and are never reused, so a crashed
// save can never be confused with a later one.
//
// Keys: "next_seq" -> decimal counter; "m/<id>" -> manifest JSON.
// Thread-safety: one writer at a time (the checkpoint owner); reads from anywhere.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "storage/checkpoint/manifest.h"

namespace rocksdb {
class DB;
}

namespace troupe::ckpt {

// Which committed checkpoints to keep: the newest `keep_last`, every one
// whose step is a multiple of `keep_every` (0: none), and every pinned one.
struct RetentionPolicy {
  int keep_last = 3;
  int64_t keep_every = 0;
};

class Catalog {
 public:
  static Expected<std::unique_ptr<Catalog>> Open(const std::string& dir);
  // For reading only (List, Get, Latest, Expired): takes no lock, so it
  // works while the owner (a training run, the coordinator) has the
  // catalog open; the view is the catalog as of the open. Writes fail.
  static Expected<std::unique_ptr<Catalog>> OpenReadOnly(const std::string& dir);
  ~Catalog();

  // A fresh id for a save that is about to start (durable before it returns).
  Expected<std::string> ReserveId();
  // Makes `m` a committed checkpoint (one synced write of its manifest).
  Status Commit(const Manifest& m);
  // Committed manifests, oldest first (by id). A damaged manifest is a
  // Corruption naming its key.
  Expected<std::vector<Manifest>> List() const;
  Expected<Manifest> Get(const std::string& id) const;  // NotFound names the id
  // The newest committed checkpoint, NotFound when there is none.
  Expected<Manifest> Latest() const;
  Status SetPinned(const std::string& id, bool pinned);
  // Removes the manifest (the caller drops the shards afterwards: a shard
  // without a manifest is garbage, a manifest without shards would not be).
  Status Remove(const std::string& id);
  // Ids the policy no longer keeps, oldest first.
  Expected<std::vector<std::string>> Expired(const RetentionPolicy& policy) const;

  // For tests: overwrite a manifest's raw bytes.
  Status PutRawForTest(const std::string& id, const std::string& bytes);

 private:
  explicit Catalog(rocksdb::DB* db) : db_(db) {}
  rocksdb::DB* db_;
};

}  // namespace troupe::ckpt
