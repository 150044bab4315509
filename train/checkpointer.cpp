#include "train/checkpointer.h"

#include <chrono>
#include <filesystem>
#include <set>

namespace troupe {
std::string LocalStoreDir(const std::string& dir, int i) { return dir + "/store-" + std::to_string(i); }
std::string LocalStoreId(int i) { return "local-" + std::to_string(i); }

ReadableStores OpenStoresFor(const std::string& dir, const ckpt::Manifest& m, const ckpt::StoreSet& open,
                             ckpt::ReadStats* stats) {
  ReadableStores out;
  out.stores = open;
  std::set<std::string> named;
  for (const ckpt::TensorRecord& t : m.tensors)
    for (const ckpt::ShardRef& s : t.shards) named.insert(s.stores.begin(), s.stores.end());
  for (const std::string& id : named) {
    // Only this folder's own stores ("local-<i>" in store-<i>); others (a
    // cluster node's) are not here.
    if (out.stores.count(id) || id.rfind("local-", 0) != 0 || id.size() == 6 || id.size() > 15 ||
        id.find_first_not_of("0123456789", 6) != std::string::npos)
      continue;
    const int i = std::stoi(id.substr(6));
    if (LocalStoreId(i) != id) continue;  // "local-007" is not store-7's name
    auto store = ckpt::ShardStore::OpenReadOnly(LocalStoreDir(dir, i), id);
    if (!store.ok()) {
      if (stats) stats->failures.push_back(store.status().message());
      continue;
    }
    out.stores[id] = store->get();
    out.opened.push_back(std::move(store).value());
  }
  return out;
}

Expected<std::unique_ptr<AsyncCheckpointer>> AsyncCheckpointer::Open(const std::string& dir,
                                                                     const CheckpointConfig& config) {
  TROUPE_RETURN_IF_ERROR(ValidateCheckpointConfig(config));
  // Here the stores are this process's folders: a replication they cannot
  // hold is a mistake, not something to round down silently.
  if (config.replication > config.stores)
    return Status::InvalidArgument(
        "checkpoint.replication = " + std::to_string(config.replication) +
        " needs at least as many stores (checkpoint.stores = " + std::to_string(config.stores) + ")");
  std::unique_ptr<AsyncCheckpointer> c(new AsyncCheckpointer());
  c->config_ = config;
  TROUPE_ASSIGN_OR_RETURN(c->catalog_, ckpt::Catalog::Open(dir));
  for (int i = 0; i < config.stores; ++i) {
    TROUPE_ASSIGN_OR_RETURN(auto store, ckpt::ShardStore::Open(LocalStoreDir(dir, i), LocalStoreId(i)));
    c->store_set_[store->id()] = store.get();
    c->stores_.push_back(std::move(store));
  }
  // Shards of crashed saves (no manifest) go; committed checkpoints stay.
  ckpt::RetentionPolicy keep_all{1 << 30, 0};
  TROUPE_RETURN_IF_ERROR(ckpt::CollectGarbage(*c->catalog_, c->store_set_, keep_all).status());
  c->worker_ = std::make_unique<SaveWorker<ckpt::Snapshot>>(
      [p = c.get()](ckpt::Snapshot& snap) -> std::optional<SaveResult> { return p->Write(snap); });
  return c;
}

AsyncCheckpointer::~AsyncCheckpointer() {
  worker_.reset();                      // the save in flight ends first
  ckpt::StagingPool::Shared().Clear();  // no more saves: give the staging copy back
}

SaveResult AsyncCheckpointer::Write(ckpt::Snapshot& snap) {
  SaveResult result;
  const auto start = std::chrono::steady_clock::now();
  ckpt::SaveOptions opts{EffectiveReplication(config_, config_.stores), config_.shards_per_tensor};
  auto m = ckpt::SaveCheckpoint(snap, store_set_, *catalog_, opts);
  ckpt::StagingPool::Shared().Recycle(std::move(snap));  // owned bytes to the pool; releases the arena
  if (m.ok()) {
    result.manifest = std::move(m).value();
    ckpt::RetentionPolicy policy{config_.keep_last, config_.keep_every};
    auto dropped = ckpt::CollectGarbage(*catalog_, store_set_, policy, result.manifest.id);
    if (dropped.ok()) {
      result.dropped = std::move(dropped).value();
    } else {
      result.status = dropped.status().WithContext("checkpoint retention (the save itself is committed)");
    }
  } else {
    result.status = m.status();
  }
  result.write_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

Expected<CheckpointFolder> OpenCheckpointFolder(const std::string& dir, bool read_only) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir + "/catalog", ec))
    return Status::NotFound("no checkpoint catalog under " + dir + " (expected " + dir + "/catalog)");
  CheckpointFolder f;
  if (read_only) {
    TROUPE_ASSIGN_OR_RETURN(f.catalog, ckpt::Catalog::OpenReadOnly(dir));
  } else {
    TROUPE_ASSIGN_OR_RETURN(f.catalog, ckpt::Catalog::Open(dir));
  }
  // Every store-<i> folder, in order (a distributed run's ranks, gaps allowed).
  std::set<int> found;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("store-", 0) != 0 || name.size() == 6 || name.size() > 15 ||
        name.find_first_not_of("0123456789", 6) != std::string::npos || !e.is_directory(ec))
      continue;
    const int i = std::stoi(name.substr(6));
    if (name == "store-" + std::to_string(i)) found.insert(i);  // not "store-007"
  }
  for (int i : found) {
    auto store = read_only ? ckpt::ShardStore::OpenReadOnly(LocalStoreDir(dir, i), LocalStoreId(i))
                           : ckpt::ShardStore::Open(LocalStoreDir(dir, i), LocalStoreId(i));
    if (!store.ok()) return store.status();
    f.store_set[(*store)->id()] = store->get();
    f.stores.push_back(std::move(store).value());
  }
  return f;
}

}  // namespace troupe
