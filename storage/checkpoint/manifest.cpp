#include "storage/checkpoint/manifest.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>

#include "common/crc32c.h"

namespace troupe::ckpt {
namespace {

using json = nlohmann::json;

Status Bad(const std::string& what) { return Status::Corruption("checkpoint manifest: " + what); }

template <typename T>
Status Get(const json& j, const char* key, T& out, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return Bad(where + " has no field '" + key + "'");
  try {
    out = it->get<T>();
  } catch (const json::exception& e) {
    return Bad(where + " field '" + key + "' has the wrong type (" + e.what() + ")");
  }
  return Status::Ok();
}

}  // namespace

int64_t RowsOf(const std::vector<int64_t>& shape) {
  int64_t r = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) r *= shape[i];
  return r;
}

int64_t TensorRecord::rows() const { return RowsOf(shape); }

int64_t TensorRecord::row_bytes() const {
  const int64_t r = rows();
  return r == 0 ? 0 : static_cast<int64_t>(bytes) / r;
}

const TensorRecord* Manifest::Find(const std::string& name) const {
  for (const TensorRecord& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

uint64_t Manifest::TotalBytes() const {
  uint64_t b = 0;
  for (const TensorRecord& t : tensors) b += t.bytes;
  return b;
}

std::string ConfigHash(const std::string& config_text) {
  char buf[9];
  std::snprintf(buf, sizeof(buf), "%08x",
                Crc32c({reinterpret_cast<const uint8_t*>(config_text.data()), config_text.size()}));
  return buf;
}

std::string EncodeManifest(const Manifest& m) {
  json tensors = json::array();
  for (const TensorRecord& t : m.tensors) {
    json shards = json::array();
    for (const ShardRef& s : t.shards)
      shards.push_back({{"rows", {s.row_begin, s.row_end}}, {"crc32c", s.crc32c}, {"stores", s.stores}});
    tensors.push_back({{"name", t.name},
                       {"dtype", t.dtype},
                       {"shape", t.shape},
                       {"bytes", t.bytes},
                       {"crc32c", t.crc32c},
                       {"shards", shards}});
  }
  // JSON has no NaN or infinity (nlohmann would write null, which no reader
  // takes back): those metrics are written as the strings "nan", "inf", "-inf".
  json metrics = json::object();
  for (const auto& [name, v] : m.metrics) {
    if (std::isfinite(v)) {
      metrics[name] = v;
    } else {
      metrics[name] = std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
    }
  }
  json loaders = json::object();
  for (const auto& [name, p] : m.loaders) loaders[name] = {{"epoch", p.epoch}, {"cursor", p.cursor}};
  json j = {{"format", "troupe.checkpoint"},
            {"version", kManifestVersion},
            {"id", m.id},
            {"step", m.step},
            {"phase", m.phase},
            {"created_unix_ms", m.created_unix_ms},
            {"layout", {{"pp", m.layout.pp}, {"ep", m.layout.ep}, {"dp", m.layout.dp}}},
            {"replication", m.replication},
            {"loaders", loaders},
            {"seed", m.seed},
            {"metrics", metrics},
            {"config_text", m.config_text},
            {"config_hash", m.config_hash},
            {"pinned", m.pinned},
            {"tensors", tensors}};
  return j.dump();
}

Expected<Manifest> DecodeManifest(const std::string& bytes) {
  json j = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("not a JSON object");
  std::string format;
  int version = 0;
  TROUPE_RETURN_IF_ERROR(Get(j, "format", format, "manifest"));
  if (format != "troupe.checkpoint") return Bad("format is '" + format + "', not 'troupe.checkpoint'");
  TROUPE_RETURN_IF_ERROR(Get(j, "version", version, "manifest"));
  if (version != kManifestVersion)
    return Bad("version " + std::to_string(version) + " (this build reads " + std::to_string(kManifestVersion) + ")");
  Manifest m;
  json layout, loaders, tensors;
  TROUPE_RETURN_IF_ERROR(Get(j, "id", m.id, "manifest"));
  const std::string where = "manifest " + m.id;
  TROUPE_RETURN_IF_ERROR(Get(j, "step", m.step, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "phase", m.phase, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "created_unix_ms", m.created_unix_ms, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "layout", layout, where));
  TROUPE_RETURN_IF_ERROR(Get(layout, "pp", m.layout.pp, where + " layout"));
  TROUPE_RETURN_IF_ERROR(Get(layout, "ep", m.layout.ep, where + " layout"));
  TROUPE_RETURN_IF_ERROR(Get(layout, "dp", m.layout.dp, where + " layout"));
  TROUPE_RETURN_IF_ERROR(Get(j, "replication", m.replication, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "seed", m.seed, where));
  json metrics;
  TROUPE_RETURN_IF_ERROR(Get(j, "metrics", metrics, where));
  if (!metrics.is_object()) return Bad(where + " field 'metrics' is not an object");
  for (const auto& [name, v] : metrics.items()) {
    if (v.is_number()) {
      m.metrics[name] = v.get<double>();
    } else if (v == "nan") {
      m.metrics[name] = std::numeric_limits<double>::quiet_NaN();
    } else if (v == "inf" || v == "-inf") {
      m.metrics[name] = (v == "inf" ? 1.0 : -1.0) * std::numeric_limits<double>::infinity();
    } else {
      return Bad(where + " metric '" + name + "' is not a number");
    }
  }
  TROUPE_RETURN_IF_ERROR(Get(j, "config_text", m.config_text, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "config_hash", m.config_hash, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "pinned", m.pinned, where));
  TROUPE_RETURN_IF_ERROR(Get(j, "loaders", loaders, where));
  if (!loaders.is_object()) return Bad(where + " field 'loaders' is not an object");
  for (const auto& [name, p] : loaders.items()) {
    LoaderPosition pos;
    TROUPE_RETURN_IF_ERROR(Get(p, "epoch", pos.epoch, where + " loader " + name));
    TROUPE_RETURN_IF_ERROR(Get(p, "cursor", pos.cursor, where + " loader " + name));
    m.loaders[name] = pos;
  }
  TROUPE_RETURN_IF_ERROR(Get(j, "tensors", tensors, where));
  if (!tensors.is_array()) return Bad(where + " field 'tensors' is not an array");
  for (const json& jt : tensors) {
    TensorRecord t;
    json shards;
    TROUPE_RETURN_IF_ERROR(Get(jt, "name", t.name, where + " tensor"));
    const std::string tw = where + " tensor " + t.name;
    TROUPE_RETURN_IF_ERROR(Get(jt, "dtype", t.dtype, tw));
    TROUPE_RETURN_IF_ERROR(Get(jt, "shape", t.shape, tw));
    TROUPE_RETURN_IF_ERROR(Get(jt, "bytes", t.bytes, tw));
    TROUPE_RETURN_IF_ERROR(Get(jt, "crc32c", t.crc32c, tw));
    TROUPE_RETURN_IF_ERROR(Get(jt, "shards", shards, tw));
    if (!shards.is_array()) return Bad(tw + " field 'shards' is not an array");
    int64_t elems = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return Bad(tw + " has a negative dimension");
      elems *= d;
    }
    if (elems == 0 ? t.bytes != 0 : t.bytes % static_cast<uint64_t>(elems) != 0)
      return Bad(tw + ": bytes do not match the shape");
    if (m.Find(t.name) != nullptr) return Bad(where + " has two tensors named " + t.name);
    int64_t next_row = 0;  // shards must tile [0, rows) in order
    for (const json& js : shards) {
      ShardRef s;
      std::vector<int64_t> rows;
      TROUPE_RETURN_IF_ERROR(Get(js, "rows", rows, tw + " shard"));
      if (rows.size() != 2) return Bad(tw + " shard 'rows' is not [begin, end]");
      s.row_begin = rows[0];
      s.row_end = rows[1];
      TROUPE_RETURN_IF_ERROR(Get(js, "crc32c", s.crc32c, tw + " shard"));
      TROUPE_RETURN_IF_ERROR(Get(js, "stores", s.stores, tw + " shard"));
      if (s.row_begin != next_row || s.row_end < s.row_begin)
        return Bad(tw + " shards do not tile its rows (a shard starts at row " + std::to_string(s.row_begin) +
                   ", expected " + std::to_string(next_row) + ")");
      if (s.stores.empty()) return Bad(tw + " has a shard kept by no store");
      next_row = s.row_end;
      t.shards.push_back(std::move(s));
    }
    if (next_row != t.rows())
      return Bad(tw + " shards cover " + std::to_string(next_row) + " of " + std::to_string(t.rows()) + " rows");
    m.tensors.push_back(std::move(t));
  }
  return m;
}

Manifest NewManifest(const RunState& state, const std::string& id, int replication) {
  Manifest m;
  static_cast<RunState&>(m) = state;
  m.id = id;
  m.created_unix_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  m.replication = replication;
  m.config_hash = ConfigHash(state.config_text);
  return m;
}

}  // namespace troupe::ckpt
