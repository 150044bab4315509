// Token shards in llm.c's .bin format.
//
//   header: 256 x int32 little-endian
//     [0] = 20240520 (magic)  [1] = 1 (version)  [2] = token count N
//     [3..255] = 0
//   body:   N x uint16 little-endian token ids
//
// The file size is exactly 1024 + 2*N bytes; anything else is corruption.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::data {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;
inline constexpr int kShardHeaderInts = 256;
inline constexpr int64_t kShardHeaderBytes = kShardHeaderInts * 4;

// Writes `tokens` to `path` atomically (temp file + rename: never a
// half-written shard). InvalidArgument if an id is outside [0, 65535] or
// there are more than INT32_MAX tokens; IOError if the OS refuses.
Status WriteShard(const std::string& path, std::span<const int> tokens);

// Reads and validates a whole shard:
//   NotFound       the file does not exist;
//   Corruption     shorter than the header, wrong magic, unknown version, or
//                  a token count that disagrees with the file size (message
//                  names the path and both numbers);
//   InvalidArgument a token id >= vocab_size (names the id and position).
Expected<std::vector<uint16_t>> ReadShard(const std::string& path, int vocab_size);

}  // namespace troupe::data
