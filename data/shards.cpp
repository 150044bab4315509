// llm.c .bin shards: see shards.h.
#include "data/shards.h"

#include <limits>

#include "data/file_io.h"

namespace troupe::data {

namespace {

void PutLE32(std::string& out, size_t at, int32_t v) {
  const auto u = static_cast<uint32_t>(v);
  for (int b = 0; b < 4; ++b) out[at + b] = static_cast<char>((u >> (8 * b)) & 0xFF);
}

int32_t GetLE32(const std::string& in, size_t at) {
  uint32_t u = 0;
  for (int b = 0; b < 4; ++b) u |= static_cast<uint32_t>(static_cast<uint8_t>(in[at + b])) << (8 * b);
  return static_cast<int32_t>(u);
}

}  // namespace

Status WriteShard(const std::string& path, std::span<const int> tokens) {
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return Status::InvalidArgument(path + ": " + std::to_string(tokens.size()) +
                                   " tokens do not fit the int32 count of a shard header");
  }
  std::string bytes(static_cast<size_t>(kShardHeaderBytes) + 2 * tokens.size(), '\0');
  PutLE32(bytes, 0, kShardMagic);
  PutLE32(bytes, 4, kShardVersion);
  PutLE32(bytes, 8, static_cast<int32_t>(tokens.size()));
  size_t at = static_cast<size_t>(kShardHeaderBytes);
  for (size_t i = 0; i < tokens.size(); ++i, at += 2) {
    const int id = tokens[i];
    if (id < 0 || id > 0xFFFF) {
      return Status::InvalidArgument(path + ": token " + std::to_string(id) + " at position " + std::to_string(i) +
                                     " does not fit uint16");
    }
    bytes[at] = static_cast<char>(id & 0xFF);
    bytes[at + 1] = static_cast<char>(id >> 8);
  }
  return WriteFileAtomic(path, bytes);
}

Expected<std::vector<uint16_t>> ReadShard(const std::string& path, int vocab_size) {
  TROUPE_ASSIGN_OR_RETURN(const std::string bytes, ReadFile(path));
  const auto size = static_cast<int64_t>(bytes.size());
  if (size < kShardHeaderBytes) {
    return Status::Corruption(path + ": truncated header: file has " + std::to_string(size) +
                              " bytes, a shard header needs " + std::to_string(kShardHeaderBytes));
  }
  const int32_t magic = GetLE32(bytes, 0);
  if (magic != kShardMagic) {
    return Status::Corruption(path + ": bad magic " + std::to_string(magic) + ", expected " +
                              std::to_string(kShardMagic) + " (not an llm.c token shard)");
  }
  const int32_t version = GetLE32(bytes, 4);
  if (version != kShardVersion) {
    return Status::Corruption(path + ": unsupported version " + std::to_string(version) + ", expected " +
                              std::to_string(kShardVersion));
  }
  const int64_t count = GetLE32(bytes, 8);
  const int64_t body = size - kShardHeaderBytes;
  if (count < 0 || body != 2 * count) {
    return Status::Corruption(path + ": header says " + std::to_string(count) + " tokens (" +
                              std::to_string(2 * count) + " bytes) but the file holds " + std::to_string(body) +
                              " bytes after the header (" + (body < 2 * count ? "truncated" : "trailing bytes") +
                              ")");
  }
  std::vector<uint16_t> tokens(static_cast<size_t>(count));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const size_t at = static_cast<size_t>(kShardHeaderBytes) + 2 * i;
    const uint16_t id = static_cast<uint16_t>(static_cast<uint8_t>(bytes[at]) |
                                              (static_cast<uint16_t>(static_cast<uint8_t>(bytes[at + 1])) << 8));
    if (id >= vocab_size) {
      return Status::InvalidArgument(path + ": token " + std::to_string(id) + " at position " + std::to_string(i) +
                                     " >= vocab_size " + std::to_string(vocab_size));
    }
    tokens[i] = id;
  }
  return tokens;
}

}  // namespace troupe::data
