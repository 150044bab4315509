#include "coordinator/state_store.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <limits>
#include <type_traits>
#include <nlohmann/json.hpp>

#include "storage/rocksdb_open.h"

namespace troupe::cluster {
namespace {

using json = nlohmann::json;

constexpr const char* kMembershipKey = "membership";
constexpr const char* kJobKey = "job";

// Parses `bytes` and checks the format header; Corruption otherwise.
Expected<json> ParseVersioned(const std::string& bytes, const std::string& key, const std::string& format,
                              int version) {
  json j = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return Status::Corruption("state store: value of '" + key + "' is not a JSON object (" +
                              std::to_string(bytes.size()) + " bytes)");
  auto f = j.find("format");
  if (f == j.end() || !f->is_string() || f->get<std::string>() != format)
    return Status::Corruption("state store: value of '" + key + "' is not a " + format + " document");
  auto v = j.find("version");
  if (v == j.end() || !v->is_number_integer())
    return Status::Corruption("state store: value of '" + key + "' has no format version");
  if (v->get<int64_t>() != version)
    return Status::Corruption("state store: value of '" + key + "' has format version " +
                              std::to_string(v->get<int64_t>()) + "; this troupe reads version " +
                              std::to_string(version));
  return j;
}

// Field access that turns nlohmann's type errors into a Status.
template <typename T>
Status Field(const json& j, const char* name, T& out, const std::string& key) {
  auto it = j.find(name);
  if (it == j.end()) return Status::Corruption("state store: '" + key + "' lacks field '" + name + "'");
  if constexpr (std::is_floating_point_v<T>) {
    if (it->is_null()) {  // NaN and infinities are written as null
      out = std::numeric_limits<T>::quiet_NaN();
      return Status::Ok();
    }
  }
  try {
    out = it->get<T>();
  } catch (const json::exception& e) {
    return Status::Corruption("state store: '" + key + "' field '" + name + "' has the wrong type");
  }
  return Status::Ok();
}

}  // namespace

Expected<std::unique_ptr<StateStore>> StateStore::Open(const std::string& dir) {
  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenRocksDb(dir, "state", "state store"));
  return std::unique_ptr<StateStore>(new StateStore(db.release()));
}

StateStore::~StateStore() { delete db_; }

Status StateStore::PutRaw(const std::string& key, const std::string& value) {
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s = db_->Put(wo, key, value);
  if (!s.ok()) return Status::IOError("state store: write of '" + key + "' failed: " + s.ToString());
  return Status::Ok();
}

Expected<std::optional<std::string>> StateStore::Get(const std::string& key) {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), key, &v);
  if (s.IsNotFound()) return std::optional<std::string>();
  if (!s.ok()) return Status::IOError("state store: read of '" + key + "' failed: " + s.ToString());
  return std::optional<std::string>(std::move(v));
}

std::string StateStore::EncodeMembership(const MembershipSnapshot& snap) {
  json nodes = json::array();
  for (const NodeRecord& n : snap.nodes) {
    json devs = json::array();
    for (const Device& d : n.spec.devices)
      devs.push_back({{"kind", d.kind}, {"name", d.name}, {"memory_bytes", d.memory_bytes}});
    nodes.push_back({{"id", n.id},
                     {"name", n.spec.name},
                     {"host", n.spec.host},
                     {"devices", devs},
                     {"memory_bytes", n.spec.memory_bytes},
                     {"capacity", n.spec.capacity},
                     {"incarnation", n.spec.incarnation},
                     {"public_key", n.spec.public_key},
                     {"state", NodeStateName(n.state)},
                     {"joined_epoch", n.joined_epoch}});
  }
  json j = {{"format", "troupe.membership"}, {"version", kMembershipFormatVersion},
            {"epoch", snap.epoch},           {"next_id", snap.next_id},
            {"nodes", nodes}};
  return j.dump();
}

Expected<MembershipSnapshot> StateStore::DecodeMembership(const std::string& bytes) {
  const std::string key = kMembershipKey;
  TROUPE_ASSIGN_OR_RETURN(json j, ParseVersioned(bytes, key, "troupe.membership", kMembershipFormatVersion));
  MembershipSnapshot s;
  TROUPE_RETURN_IF_ERROR(Field(j, "epoch", s.epoch, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "next_id", s.next_id, key));
  json nodes;
  TROUPE_RETURN_IF_ERROR(Field(j, "nodes", nodes, key));
  if (!nodes.is_array()) return Status::Corruption("state store: 'membership' field 'nodes' is not an array");
  for (const json& jn : nodes) {
    if (!jn.is_object()) return Status::Corruption("state store: 'membership' has a node that is not an object");
    NodeRecord n;
    std::string state;
    json devs;
    TROUPE_RETURN_IF_ERROR(Field(jn, "id", n.id, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "name", n.spec.name, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "host", n.spec.host, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "memory_bytes", n.spec.memory_bytes, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "capacity", n.spec.capacity, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "incarnation", n.spec.incarnation, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "public_key", n.spec.public_key, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "joined_epoch", n.joined_epoch, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "state", state, key));
    TROUPE_RETURN_IF_ERROR(Field(jn, "devices", devs, key));
    if (n.id.size() < 2 || n.id[0] != 'n' || n.id.find_first_not_of("0123456789", 1) != std::string::npos)
      return Status::Corruption("state store: 'membership' has a malformed node id '" + n.id + "'");
    auto st = ParseNodeState(state);
    if (!st.ok()) return st.status().WithContext("state store: 'membership'");
    n.state = *st;
    if (!devs.is_array()) return Status::Corruption("state store: 'membership' node devices is not an array");
    for (const json& jd : devs) {
      if (!jd.is_object()) return Status::Corruption("state store: 'membership' has a malformed device");
      Device d;
      TROUPE_RETURN_IF_ERROR(Field(jd, "kind", d.kind, key));
      TROUPE_RETURN_IF_ERROR(Field(jd, "name", d.name, key));
      TROUPE_RETURN_IF_ERROR(Field(jd, "memory_bytes", d.memory_bytes, key));
      n.spec.devices.push_back(std::move(d));
    }
    s.nodes.push_back(std::move(n));
  }
  return s;
}

std::string StateStore::EncodeJob(const JobRecord& r) {
  json hist = json::array();
  for (const LossPoint& p : r.history) hist.push_back({p.step, p.loss, p.main_loss, p.val_loss, p.tokens_per_s});
  json j = {{"format", "troupe.job"},
            {"version", kJobFormatVersion},
            {"config_path", r.config_path},
            {"config_name", r.config_name},
            {"toml_text", r.toml_text},
            {"state", JobStateName(r.state)},
            {"attempt", r.attempt},
            {"node_id", r.node_id},
            {"worker", r.worker},
            {"step", r.step},
            {"total_steps", r.total_steps},
            {"loss", r.loss},
            {"main_loss", r.main_loss},
            {"lr", r.lr},
            {"grad_norm", r.grad_norm},
            {"tokens_per_s", r.tokens_per_s},
            {"val_loss", r.val_loss},
            {"interruptions", r.interruptions},
            {"message", r.message},
            {"history", hist}};
  json ranks = json::array();
  for (const WorkerSlot& w : r.ranks) ranks.push_back({w.node_id, w.worker});
  j["ranks"] = ranks;
  j["dp"] = r.dp;
  j["checkpoint_id"] = r.checkpoint_id;
  j["checkpoint_step"] = r.checkpoint_step;
  return j.dump();
}

Expected<JobRecord> StateStore::DecodeJob(const std::string& bytes) {
  const std::string key = kJobKey;
  TROUPE_ASSIGN_OR_RETURN(json j, ParseVersioned(bytes, key, "troupe.job", kJobFormatVersion));
  JobRecord r;
  std::string state;
  json hist;
  TROUPE_RETURN_IF_ERROR(Field(j, "config_path", r.config_path, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "config_name", r.config_name, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "toml_text", r.toml_text, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "state", state, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "attempt", r.attempt, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "node_id", r.node_id, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "worker", r.worker, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "step", r.step, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "total_steps", r.total_steps, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "loss", r.loss, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "main_loss", r.main_loss, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "lr", r.lr, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "grad_norm", r.grad_norm, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "tokens_per_s", r.tokens_per_s, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "val_loss", r.val_loss, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "interruptions", r.interruptions, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "message", r.message, key));
  TROUPE_RETURN_IF_ERROR(Field(j, "history", hist, key));
  auto st = ParseJobState(state);
  if (!st.ok()) return st.status().WithContext("state store: 'job'");
  r.state = *st;
  if (!hist.is_array()) return Status::Corruption("state store: 'job' history is not an array");
  for (const json& p : hist) {
    if (!p.is_array() || p.size() != 5) return Status::Corruption("state store: 'job' has a malformed history point");
    LossPoint lp;
    try {
      lp = {p[0].get<int>(), p[1].get<double>(), p[2].get<double>(), p[3].get<double>(), p[4].get<double>()};
    } catch (const json::exception&) {
      return Status::Corruption("state store: 'job' has a malformed history point");
    }
    r.history.push_back(lp);
  }
  // Distributed jobs' fields; records written before them have none.
  if (j.contains("ranks")) {
    json ranks;
    TROUPE_RETURN_IF_ERROR(Field(j, "ranks", ranks, key));
    TROUPE_RETURN_IF_ERROR(Field(j, "dp", r.dp, key));
    TROUPE_RETURN_IF_ERROR(Field(j, "checkpoint_id", r.checkpoint_id, key));
    TROUPE_RETURN_IF_ERROR(Field(j, "checkpoint_step", r.checkpoint_step, key));
    if (!ranks.is_array()) return Status::Corruption("state store: 'job' ranks is not an array");
    for (const json& w : ranks) {
      if (!w.is_array() || w.size() != 2 || !w[0].is_string() || !w[1].is_number_integer())
        return Status::Corruption("state store: 'job' has a malformed rank entry");
      r.ranks.push_back({w[0].get<std::string>(), w[1].get<int>()});
    }
  } else if (!r.node_id.empty()) {
    r.ranks.push_back({r.node_id, r.worker});
  }
  return r;
}

Status StateStore::SaveMembership(const MembershipSnapshot& snap) { return PutRaw(kMembershipKey, EncodeMembership(snap)); }
Status StateStore::SaveJob(const JobRecord& job) { return PutRaw(kJobKey, EncodeJob(job)); }

Expected<std::optional<MembershipSnapshot>> StateStore::LoadMembership() {
  TROUPE_ASSIGN_OR_RETURN(auto raw, Get(kMembershipKey));
  if (!raw) return std::optional<MembershipSnapshot>();
  TROUPE_ASSIGN_OR_RETURN(auto snap, DecodeMembership(*raw));
  return std::optional<MembershipSnapshot>(std::move(snap));
}

Expected<std::optional<JobRecord>> StateStore::LoadJob() {
  TROUPE_ASSIGN_OR_RETURN(auto raw, Get(kJobKey));
  if (!raw) return std::optional<JobRecord>();
  TROUPE_ASSIGN_OR_RETURN(auto rec, DecodeJob(*raw));
  return std::optional<JobRecord>(std::move(rec));
}

}  // namespace troupe::cluster
