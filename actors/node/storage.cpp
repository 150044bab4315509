// The node's storage actor: its checkpoint shards (docs/checkpoints.md,
// "In a cluster").
//
// Saving (this node runs the job):
//   runner ─save─▶ CheckpointBegin ─▶ coordinator ─▶ CheckpointPlan{id, replicas}
//   write every shard here and sync ─▶ ShardCopy.. ShardCopyEnd to each replica
//   ─▶ CheckpointWritten{manifest} ─▶ the runner may capture again
// Replicating (another node runs it): ShardCopy.. ShardCopyEnd ─▶ sync ─▶ ShardsDurable
// Restoring: shards this node lacks (or holds damaged) are fetched from the
// live nodes the manifest names, one holder after the other until a good
// copy arrives; then the whole checkpoint is loaded and verified here.
//
// Spawned detached: every handler may block on the disk, never on another
// actor's thread.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <optional>
#include <set>

#include "actors/node/node_actors.h"

namespace troupe::node {
namespace {

using namespace protocol;

constexpr std::chrono::seconds kPlanTimeout{30};      // the coordinator answers a CheckpointBegin
constexpr std::chrono::seconds kRestoreTimeout{120};  // every missing shard has arrived

std::string ShardName(const std::string& tensor, int64_t row_begin) { return tensor + "@" + std::to_string(row_begin); }

struct PendingSave {
  uint64_t attempt = 0;
  SnapshotPtr snap;
  caf::actor runner;
};

// Shards arriving from one sender for one checkpoint.
struct Incoming {
  int64_t received = 0;
  std::vector<std::string> errors;
};

struct RestoreJob {
  ckpt::Manifest manifest;
  caf::actor runner;
  std::set<std::string> live;
  // Shards still missing: name -> (its manifest entry, the holders not yet tried).
  struct Want {
    const ckpt::TensorRecord* tensor;
    const ckpt::ShardRef* ref;
    std::vector<std::string> holders;
    std::string asked;  // the holder asked now ("" = none yet)
  };
  std::map<std::string, Want> missing;
  std::vector<std::string> failures;
  uint64_t serial = 0;
};

}  // namespace

struct StorageState {
  std::unique_ptr<ckpt::ShardStore> store;
  std::string open_error;  // why `store` is null
  std::string node_id;
  coordinator_actor coordinator;
  std::map<std::pair<uint64_t, int64_t>, PendingSave> saves;  // (attempt, step) awaiting a plan
  std::map<std::string, Incoming> incoming;                   // "<id>/<from>"
  std::optional<RestoreJob> restore;
  uint64_t restores = 0;
  static inline const char* name = "storage";
};

namespace {

using Self = storage_actor::stateful_pointer<StorageState>;

std::string Unavailable(Self self) {
  auto& st = self->state;
  if (!st.store) return "this node's shard store is not available: " + st.open_error;
  return "this node has not joined the cluster yet";
}

void FinishRestore(Self self, SnapshotPtr snap, const std::string& error) {
  auto& st = self->state;
  if (!st.restore) return;
  caf::anon_send(st.restore->runner, restore_atom_v, std::move(snap), error);
  st.restore.reset();
}

// Asks a holder for every missing shard that is not being fetched; fails
// the restore when a shard has no holder left.
void AskHolders(Self self) {
  auto& st = self->state;
  RestoreJob& r = *st.restore;
  std::map<std::string, ShardFetch> asks;
  for (auto& [name, w] : r.missing) {
    if (!w.asked.empty()) continue;
    if (w.holders.empty()) {
      std::string why = "checkpoint " + r.manifest.id + ": no live node holds a good copy of " + name;
      for (const std::string& f : r.failures) why += "; " + f;
      return FinishRestore(self, nullptr, why);
    }
    w.asked = w.holders.front();
    w.holders.erase(w.holders.begin());
    ShardFetch& f = asks[w.asked];
    f.from_node = st.node_id;
    f.to_node = w.asked;
    f.id = r.manifest.id;
    f.shards.push_back({w.tensor->name, w.ref->row_begin, w.ref->row_end});
  }
  for (auto& [holder, f] : asks) {
    spdlog::info("storage: fetching {} shards of {} from {}", f.shards.size(), f.id, holder);
    self->send(st.coordinator, std::move(f));
  }
}

// Every shard is here: load the whole checkpoint from this node's store.
void LoadIfComplete(Self self) {
  auto& st = self->state;
  if (!st.restore || !st.restore->missing.empty()) return;
  Status synced = st.store->Sync();
  if (!synced.ok()) spdlog::warn("storage: fetched shards not synced: {}", synced.message());
  ckpt::Manifest local = st.restore->manifest;
  for (ckpt::TensorRecord& t : local.tensors)
    for (ckpt::ShardRef& s : t.shards) s.stores = {st.node_id};
  ckpt::StoreSet set{{st.node_id, st.store.get()}};
  auto snap = ckpt::LoadCheckpoint(local, set);
  if (!snap.ok()) return FinishRestore(self, nullptr, snap.status().message());
  for (const std::string& f : st.restore->failures) spdlog::warn("storage: restore of {}: {}", local.id, f);
  FinishRestore(self, std::make_shared<ckpt::Snapshot>(std::move(snap).value()), "");
}

void StartRestore(Self self, const JobAssign& job, caf::actor runner) {
  auto& st = self->state;
  if (st.restore) FinishRestore(self, nullptr, "a newer restore replaced this one");
  auto m = ckpt::DecodeManifest(job.resume_manifest);
  if (!m.ok()) {
    caf::anon_send(runner, restore_atom_v, SnapshotPtr(), "the resume manifest: " + m.status().message());
    return;
  }
  if (!st.store || st.node_id.empty()) {
    caf::anon_send(runner, restore_atom_v, SnapshotPtr(), Unavailable(self));
    return;
  }
  st.restore.emplace();
  RestoreJob& r = *st.restore;
  r.manifest = std::move(m).value();
  r.runner = std::move(runner);
  r.live.insert(job.live_nodes.begin(), job.live_nodes.end());
  r.serial = ++st.restores;
  int local = 0;
  for (const ckpt::TensorRecord& t : r.manifest.tensors) {
    for (const ckpt::ShardRef& s : t.shards) {
      const bool mine = std::find(s.stores.begin(), s.stores.end(), st.node_id) != s.stores.end();
      if (mine) {
        uint32_t crc = 0;
        auto bytes = st.store->Get({r.manifest.id, t.name, s.row_begin}, &crc);
        if (bytes.ok() && crc == s.crc32c) {
          ++local;
          continue;
        }
        r.failures.push_back("local copy of " + ShardName(t.name, s.row_begin) + ": " +
                             (bytes.ok() ? "differs from the manifest" : bytes.status().message()));
      }
      RestoreJob::Want w{&t, &s, {}, ""};
      for (const std::string& h : s.stores)
        if (h != st.node_id && r.live.count(h)) w.holders.push_back(h);
      r.missing.emplace(ShardName(t.name, s.row_begin), std::move(w));
    }
  }
  spdlog::info("storage: restoring {} (step {}): {} shards here, {} to fetch", r.manifest.id, r.manifest.step, local,
               r.missing.size());
  self->delayed_send(self, kRestoreTimeout, timeout_atom_v, "restore:" + std::to_string(r.serial));
  AskHolders(self);
  if (st.restore) LoadIfComplete(self);
}

// A shard for the restore in progress.
void TakeFetched(Self self, ShardCopy& c) {
  auto& st = self->state;
  RestoreJob& r = *st.restore;
  auto it = r.missing.find(ShardName(c.tensor, c.row_begin));
  if (it == r.missing.end() || it->second.asked != c.from_node) return;
  const ckpt::ShardRef& ref = *it->second.ref;
  std::string problem;
  if (c.crc32c != ref.crc32c || c.row_end != ref.row_end) {
    problem = "differs from the manifest";
  } else {
    auto crc = st.store->Put({c.id, c.tensor, c.row_begin}, c.row_end, c.bytes);
    if (!crc.ok()) {
      problem = crc.status().message();
    } else if (*crc != ref.crc32c) {
      problem = "arrived damaged (CRC32C mismatch)";
    }
  }
  if (problem.empty()) {
    r.missing.erase(it);
  } else {
    r.failures.push_back(c.from_node + "'s copy of " + it->first + ": " + problem);
    it->second.asked.clear();  // the next holder, after this batch ends
  }
}

void Save(Self self, const CheckpointPlan& plan, PendingSave save) {
  auto& st = self->state;
  auto reply = [&](const std::string& id, const std::string& error) {
    caf::anon_send(save.runner, save_atom_v, id, error);
  };
  if (plan.id.empty()) return reply("", "the coordinator refused the save: " + plan.reason);
  const ckpt::Snapshot& snap = *save.snap;
  ckpt::SaveOptions opts;
  opts.replication = 1;
  opts.shards_per_tensor = std::max(1, plan.shards_per_tensor);
  ckpt::StoreSet set{{st.node_id, st.store.get()}};
  auto m = ckpt::WriteShards(snap, plan.id, set, opts);
  if (!m.ok()) {
    self->send(st.coordinator, CheckpointWritten{st.node_id, save.attempt, plan.id, "", m.status().message()});
    return reply(plan.id, m.status().message());
  }
  // The replicas' copies come from the snapshot in memory, not the disk.
  for (const std::string& to : plan.replicas) {
    int64_t sent = 0;
    for (size_t ti = 0; ti < snap.tensors.size(); ++ti) {
      const ckpt::HostTensor& t = snap.tensors[ti];
      const ckpt::TensorRecord& rec = m->tensors[ti];
      const int64_t row_bytes = rec.row_bytes();
      for (const ckpt::ShardRef& s : rec.shards) {
        ShardCopy c{st.node_id, to, plan.id, t.name, s.row_begin, s.row_end, s.crc32c, {}};
        const auto rows = t.data().subspan(s.row_begin * row_bytes, (s.row_end - s.row_begin) * row_bytes);
        c.bytes.assign(rows.begin(), rows.end());
        self->send(st.coordinator, std::move(c));
        ++sent;
      }
    }
    self->send(st.coordinator, ShardCopyEnd{st.node_id, to, plan.id, sent, false, {}});
  }
  self->send(st.coordinator, CheckpointWritten{st.node_id, save.attempt, plan.id, ckpt::EncodeManifest(*m), ""});
  ckpt::StagingPool::Shared().Recycle(std::move(*save.snap));  // owned bytes to the pool; releases the arena
  reply(plan.id, "");
}

storage_actor::behavior_type Storage(Self self, std::string dir, coordinator_actor coordinator) {
  auto& st = self->state;
  st.coordinator = std::move(coordinator);
  auto store = ckpt::ShardStore::Open(dir + "/store", "pending");
  if (store.ok()) {
    st.store = std::move(store).value();
  } else {
    st.open_error = store.status().message();
    spdlog::error("storage: {}; this node keeps no checkpoint shards", st.open_error);
  }
  return {
      [=](joined_atom, const std::string& node_id) {
        auto& st = self->state;
        if (st.node_id == node_id) return;
        // The store's id names it in manifests: the node id the coordinator gave.
        if (st.store) {
          st.store.reset();
          auto reopened = ckpt::ShardStore::Open(dir + "/store", node_id);
          if (reopened.ok()) {
            st.store = std::move(reopened).value();
          } else {
            st.open_error = reopened.status().message();
          }
        }
        st.node_id = node_id;
      },
      [=](save_atom, uint64_t attempt, SnapshotPtr& snap, caf::actor& runner) {
        auto& st = self->state;
        if (!st.store || st.node_id.empty() || !snap) {
          caf::anon_send(runner, save_atom_v, std::string(), snap ? Unavailable(self) : std::string("no snapshot"));
          return;
        }
        const int64_t step = snap->step;
        st.saves[{attempt, step}] = PendingSave{attempt, std::move(snap), std::move(runner)};
        self->send(st.coordinator, CheckpointBegin{st.node_id, attempt, step});
        self->delayed_send(self, kPlanTimeout, timeout_atom_v,
                           "save:" + std::to_string(attempt) + ":" + std::to_string(step));
      },
      [=](restore_atom, const JobAssign& job, caf::actor& runner) { StartRestore(self, job, std::move(runner)); },
      [=](const CheckpointPlan& plan) {
        auto& st = self->state;
        auto it = st.saves.find({plan.attempt, plan.step});
        if (it == st.saves.end()) return;  // timed out: the coordinator abandons it too
        PendingSave save = std::move(it->second);
        st.saves.erase(it);
        Save(self, plan, std::move(save));
      },
      [=](ShardCopy& c) {
        auto& st = self->state;
        if (st.restore && c.id == st.restore->manifest.id) return TakeFetched(self, c);
        Incoming& in = st.incoming[c.id + "/" + c.from_node];
        if (!st.store) {
          in.errors.push_back(Unavailable(self));
          return;
        }
        auto crc = st.store->Put({c.id, c.tensor, c.row_begin}, c.row_end, c.bytes);
        if (!crc.ok()) {
          in.errors.push_back(crc.status().message());
        } else if (*crc != c.crc32c) {
          in.errors.push_back(ShardName(c.tensor, c.row_begin) + " arrived damaged (CRC32C mismatch)");
        } else {
          ++in.received;
        }
      },
      [=](ShardCopyEnd& e) {
        auto& st = self->state;
        if (e.fetch) {
          if (!st.restore || e.id != st.restore->manifest.id) return;
          RestoreJob& r = *st.restore;
          for (const std::string& err : e.errors) r.failures.push_back(e.from_node + ": " + err);
          // Whatever this holder did not deliver goes to the next one.
          for (auto& [name, w] : r.missing)
            if (w.asked == e.from_node) w.asked.clear();
          AskHolders(self);
          LoadIfComplete(self);
          return;
        }
        const std::string key = e.id + "/" + e.from_node;
        Incoming in = std::move(st.incoming[key]);
        st.incoming.erase(key);
        std::string error;
        for (const std::string& err : e.errors) error += (error.empty() ? "" : "; ") + err;
        for (const std::string& err : in.errors) error += (error.empty() ? "" : "; ") + err;
        if (error.empty() && in.received != e.shards)
          error = "received " + std::to_string(in.received) + " of " + std::to_string(e.shards) + " shards";
        if (error.empty()) {
          Status s = st.store->Sync();
          if (!s.ok()) error = s.message();
        }
        if (!error.empty()) spdlog::warn("storage: replica of {} from {} failed: {}", e.id, e.from_node, error);
        self->send(st.coordinator, ShardsDurable{st.node_id, e.id, in.received, error});
      },
      [=](const ShardFetch& f) {
        auto& st = self->state;
        ShardCopyEnd end{st.node_id, f.from_node, f.id, 0, true, {}};
        for (const ShardWant& w : f.shards) {
          if (!st.store) {
            end.errors.push_back(Unavailable(self));
            break;
          }
          uint32_t crc = 0;
          auto bytes = st.store->Get({f.id, w.tensor, w.row_begin}, &crc);
          if (!bytes.ok()) {
            end.errors.push_back(bytes.status().message());
            continue;
          }
          self->send(st.coordinator, ShardCopy{st.node_id, f.from_node, f.id, w.tensor, w.row_begin, w.row_end, crc,
                                               std::move(*bytes)});
          ++end.shards;
        }
        self->send(st.coordinator, std::move(end));
      },
      [=](const DropCheckpoint& d) {
        auto& st = self->state;
        if (!st.store) return;
        Status s = st.store->Drop(d.id);
        if (!s.ok()) spdlog::warn("storage: could not drop {}: {}", d.id, s.message());
      },
      [=](timeout_atom, const std::string& what) {
        auto& st = self->state;
        if (what.rfind("restore:", 0) == 0) {
          if (st.restore && what == "restore:" + std::to_string(st.restore->serial))
            FinishRestore(self, nullptr,
                          "checkpoint " + st.restore->manifest.id + ": " + std::to_string(st.restore->missing.size()) +
                              " shards did not arrive within " + std::to_string(kRestoreTimeout.count()) + " s");
          return;
        }
        for (auto it = st.saves.begin(); it != st.saves.end(); ++it) {
          if (what != "save:" + std::to_string(it->first.first) + ":" + std::to_string(it->first.second)) continue;
          caf::anon_send(it->second.runner, save_atom_v, std::string(),
                         std::string("the coordinator did not answer the save within ") +
                             std::to_string(kPlanTimeout.count()) + " s");
          st.saves.erase(it);
          return;
        }
      },
  };
}

}  // namespace

storage_actor SpawnStorage(caf::local_actor* parent, std::string dir, coordinator_actor coordinator) {
  return parent->spawn<caf::detached + caf::linked>(Storage, std::move(dir), std::move(coordinator));
}

}  // namespace troupe::node
