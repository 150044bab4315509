#include "coordinator/checkpoint_keeper.h"

#include <algorithm>

namespace troupe::cluster {

Expected<std::unique_ptr<CheckpointKeeper>> CheckpointKeeper::Open(const std::string& dir,
                                                                   const CheckpointConfig& config,
                                                                   std::chrono::seconds timeout) {
  TROUPE_RETURN_IF_ERROR(ValidateCheckpointConfig(config));
  std::unique_ptr<CheckpointKeeper> k(new CheckpointKeeper());
  k->config_ = config;
  k->timeout_ = timeout;
  TROUPE_ASSIGN_OR_RETURN(k->catalog_, ckpt::Catalog::Open(dir));
  return k;
}

Expected<SavePlan> CheckpointKeeper::Begin(const std::string& writer, uint64_t attempt, int64_t step,
                                           const std::vector<std::string>& live, Clock::time_point now) {
  auto self = std::find(live.begin(), live.end(), writer);
  if (self == live.end())
    return Status::InvalidArgument("checkpoint: node " + writer + " may not keep a copy (not alive, or draining)");
  const int copies = EffectiveReplication(config_, static_cast<int>(live.size()));
  SavePlan plan;
  const size_t at = static_cast<size_t>(self - live.begin());
  for (int r = 1; r < copies; ++r) plan.replicas.push_back(live[(at + r) % live.size()]);
  TROUPE_ASSIGN_OR_RETURN(plan.id, catalog_->ReserveId());
  Pending p;
  p.writer = writer;
  p.attempt = attempt;
  p.step = step;
  p.replicas.insert(plan.replicas.begin(), plan.replicas.end());
  p.started = now;
  pending_[plan.id] = std::move(p);
  return plan;
}

void CheckpointKeeper::Abandon(const std::string& id, const std::string& why, KeeperOutcome* out) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  out->failures.push_back("checkpoint " + id + " (step " + std::to_string(it->second.step) + ") abandoned: " + why);
  out->drop.push_back(id);
  pending_.erase(it);
}

KeeperOutcome CheckpointKeeper::OnWritten(const std::string& writer, const std::string& id,
                                          const std::string& manifest_json, const std::string& error) {
  KeeperOutcome out;
  auto it = pending_.find(id);
  if (it == pending_.end() || it->second.writer != writer) return out;  // abandoned already, or not its save
  if (!error.empty()) {
    Abandon(id, "the writer " + writer + " failed: " + error, &out);
    return out;
  }
  auto m = ckpt::DecodeManifest(manifest_json);
  if (!m.ok()) {
    Abandon(id, "the writer's manifest is unreadable: " + m.status().message(), &out);
    return out;
  }
  if (m->id != id || m->step != it->second.step) {
    Abandon(id, "the writer's manifest is for " + m->id + " step " + std::to_string(m->step), &out);
    return out;
  }
  for (const ckpt::TensorRecord& t : m->tensors)
    for (const ckpt::ShardRef& s : t.shards)
      if (s.stores != std::vector<std::string>{writer}) {
        Abandon(id, "the writer's manifest names stores other than itself", &out);
        return out;
      }
  it->second.draft = std::move(m).value();
  return MaybeCommit(id);
}

KeeperOutcome CheckpointKeeper::OnDurable(const std::string& node, const std::string& id, const std::string& error) {
  KeeperOutcome out;
  auto it = pending_.find(id);
  if (it == pending_.end() || !it->second.replicas.count(node)) return out;
  if (!error.empty()) {
    Abandon(id, "replica " + node + " failed: " + error, &out);
    return out;
  }
  it->second.durable.insert(node);
  return MaybeCommit(id);
}

KeeperOutcome CheckpointKeeper::MaybeCommit(const std::string& id) {
  KeeperOutcome out;
  auto it = pending_.find(id);
  Pending& p = it->second;
  if (!p.draft || p.durable != p.replicas) return out;
  ckpt::Manifest m = std::move(*p.draft);
  std::vector<std::string> stores{p.writer};
  stores.insert(stores.end(), p.replicas.begin(), p.replicas.end());
  for (ckpt::TensorRecord& t : m.tensors)
    for (ckpt::ShardRef& s : t.shards) s.stores = stores;
  m.replication = static_cast<int>(stores.size());
  pending_.erase(it);
  Status s = catalog_->Commit(m);
  if (!s.ok()) {
    // The write may still have landed (see SaveCheckpoint): keep the shards.
    out.failures.push_back("checkpoint " + id + " could not be committed: " + s.message());
    return out;
  }
  auto expired = catalog_->Expired({config_.keep_last, config_.keep_every});
  if (!expired.ok()) {
    out.failures.push_back("checkpoint retention: " + expired.status().message());
  } else {
    for (const std::string& old : *expired) {
      Status r = catalog_->Remove(old);  // the manifest first: a shard without one is garbage
      if (r.ok()) {
        out.drop.push_back(old);
      } else {
        out.failures.push_back("checkpoint retention: " + r.message());
      }
    }
  }
  out.committed = std::move(m);
  return out;
}

KeeperOutcome CheckpointKeeper::OnNodeLost(const std::string& node) {
  KeeperOutcome out;
  std::vector<std::string> waiting;
  for (const auto& [id, p] : pending_)
    if ((p.writer == node && !p.draft) || (p.replicas.count(node) && !p.durable.count(node))) waiting.push_back(id);
  for (const std::string& id : waiting) Abandon(id, "node " + node + " was lost before its copy was durable", &out);
  return out;
}

KeeperOutcome CheckpointKeeper::Expire(Clock::time_point now) {
  KeeperOutcome out;
  std::vector<std::string> late;
  for (const auto& [id, p] : pending_)
    if (now - p.started > timeout_) late.push_back(id);
  for (const std::string& id : late)
    Abandon(id, "not durable on every node within " + std::to_string(timeout_.count()) + " s", &out);
  return out;
}

Expected<std::optional<ckpt::Manifest>> CheckpointKeeper::LatestFor(const std::string& config_hash) const {
  TROUPE_ASSIGN_OR_RETURN(std::vector<ckpt::Manifest> all, catalog_->List());
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    if (it->config_hash == config_hash) return std::optional<ckpt::Manifest>(std::move(*it));
  return std::optional<ckpt::Manifest>();
}

}  // namespace troupe::cluster
