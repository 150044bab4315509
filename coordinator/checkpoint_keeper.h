// CheckpointKeeper: the coordinator's half of cluster checkpoints
// (docs/checkpoints.md, "In a cluster"). A plain class, unit-tested without
// actors; the job actor owns it and does the messaging.
//
//   Begin (writer asks)   -> an id from the catalog and the replica nodes
//   OnWritten (writer)    -> its copy is durable; the manifest draft
//   OnDurable (replica)   -> that replica has synced every shard
//   all of them in        -> the manifest, listing every node, is committed;
//                            retention then expires older ones
//   a node lost / timeout -> the save is abandoned: never listed, its shards
//                            dropped wherever they went
//
// Nothing is committed unless the writer and every replica reported their
// copy durable, so a committed checkpoint survives the loss of any
// replication - 1 nodes.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "configs/config.h"
#include "storage/checkpoint/catalog.h"

namespace troupe::cluster {

struct SavePlan {
  std::string id;
  std::vector<std::string> replicas;  // nodes other than the writer
};

// What the job actor must do after an event.
struct KeeperOutcome {
  std::optional<ckpt::Manifest> committed;
  std::vector<std::string> drop;  // ids whose shards every node should delete
  std::vector<std::string> failures;  // one line per abandoned save
};

class CheckpointKeeper {
 public:
  using Clock = std::chrono::steady_clock;
  // The catalog lives at <dir>/catalog. `timeout`: a save not committed
  // this long after Begin is abandoned.
  static Expected<std::unique_ptr<CheckpointKeeper>> Open(const std::string& dir, const CheckpointConfig& config,
                                                          std::chrono::seconds timeout = std::chrono::seconds(120));

  // `live`: the nodes that may keep a copy (alive, not draining), the
  // writer among them. Replicas are the next EffectiveReplication - 1 of
  // them after the writer, in `live`'s order.
  Expected<SavePlan> Begin(const std::string& writer, uint64_t attempt, int64_t step,
                           const std::vector<std::string>& live, Clock::time_point now);
  // The writer's copy: `manifest_json` (its stores: the writer only) or `error`.
  KeeperOutcome OnWritten(const std::string& writer, const std::string& id, const std::string& manifest_json,
                          const std::string& error);
  KeeperOutcome OnDurable(const std::string& node, const std::string& id, const std::string& error);
  // Saves still waiting on `node` are abandoned.
  KeeperOutcome OnNodeLost(const std::string& node);
  KeeperOutcome Expire(Clock::time_point now);

  // The newest committed checkpoint of the config whose text hashes to
  // `config_hash`; nullopt when there is none.
  Expected<std::optional<ckpt::Manifest>> LatestFor(const std::string& config_hash) const;
  ckpt::Catalog& catalog() { return *catalog_; }
  size_t pending() const { return pending_.size(); }

 private:
  struct Pending {
    std::string writer;
    uint64_t attempt = 0;
    int64_t step = 0;
    std::set<std::string> replicas, durable;
    std::optional<ckpt::Manifest> draft;
    Clock::time_point started;
  };
  CheckpointKeeper() = default;
  // Commits `id` if everything is in.
  KeeperOutcome MaybeCommit(const std::string& id);
  void Abandon(const std::string& id, const std::string& why, KeeperOutcome* out);

  CheckpointConfig config_;
  std::chrono::seconds timeout_{120};
  std::unique_ptr<ckpt::Catalog> catalog_;
  std::map<std::string, Pending> pending_;
};

}  // namespace troupe::cluster
