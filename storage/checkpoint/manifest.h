// Manifest: the description of one committed checkpoint, as the catalog
// stores it (JSON, format "troupe.checkpoint", version 1; docs/checkpoints.md).
//
// A checkpoint is a set of tensors (model parameters, AdamW moments, routing
// biases, under their internal names), each cut into row-range shards. Every
// shard is kept by one or more stores (a store = one node's RocksDB shard
// database) and carries the CRC32C of its bytes. Next to the tensors the
// manifest holds everything a resume needs to continue as if nothing had
// happened: the step, the data loaders' positions, the seed, the config text.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::ckpt {

inline constexpr int kManifestVersion = 1;

// Rows [row_begin, row_end) of a tensor (rows = product of all dims but the
// last), kept by the stores named in `stores`.
struct ShardRef {
  int64_t row_begin = 0;
  int64_t row_end = 0;
  uint32_t crc32c = 0;  // of the shard's bytes
  std::vector<std::string> stores;
  bool operator==(const ShardRef&) const = default;
};

// Rows of a row-major tensor: the product of all dimensions but the last
// (1 for a scalar or a 1-D tensor).
int64_t RowsOf(const std::vector<int64_t>& shape);

struct TensorRecord {
  std::string name;
  std::string dtype;  // "F32", "BF16", ... (safetensors spelling)
  std::vector<int64_t> shape;
  uint64_t bytes = 0;
  uint32_t crc32c = 0;  // of the whole tensor's bytes, row-major
  std::vector<ShardRef> shards;
  int64_t rows() const;
  int64_t row_bytes() const;  // bytes / rows (0 when rows == 0)
  bool operator==(const TensorRecord&) const = default;
};

struct Layout {
  int pp = 1, ep = 1, dp = 1;
  bool operator==(const Layout&) const = default;
};

struct LoaderPosition {
  uint64_t epoch = 0;
  uint64_t cursor = 0;
  bool operator==(const LoaderPosition&) const = default;
};

// Where the run stood: what a manifest records and a snapshot carries
// besides the tensors (a save copies it one way, a load the other).
struct RunState {
  int64_t step = 0;
  std::string phase = "pretrain";
  Layout layout;
  std::map<std::string, LoaderPosition> loaders;  // "train", "val"
  uint64_t seed = 0;
  std::map<std::string, double> metrics;  // loss, val_loss, lr, grad_norm, ... (NaN/inf kept, as strings in JSON)
  std::string config_text;                // the TOML the run was started with
  bool operator==(const RunState&) const = default;
};

struct Manifest : RunState {
  std::string id;  // "ckpt-000007": a catalog sequence number, never reused
  int64_t created_unix_ms = 0;
  int replication = 1;
  std::vector<TensorRecord> tensors;
  std::string config_hash;  // CRC32C of config_text, 8 hex digits
  bool pinned = false;
  bool operator==(const Manifest&) const = default;

  const TensorRecord* Find(const std::string& name) const;
  uint64_t TotalBytes() const;
};

std::string EncodeManifest(const Manifest& m);
// Corruption naming the field on anything malformed (wrong format/version,
// missing or ill-typed field, shards that do not tile a tensor's rows, bytes
// that do not fit the shape, two tensors of one name).
Expected<Manifest> DecodeManifest(const std::string& bytes);

std::string ConfigHash(const std::string& config_text);

// A manifest for checkpoint `id` of a run in `state`: created now, its
// config hash computed; tensors are the caller's to fill in.
Manifest NewManifest(const RunState& state, const std::string& id, int replication);

}  // namespace troupe::ckpt
