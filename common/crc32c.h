// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
// ext4 and RocksDB. Debian 12 ships no crc32c C/C++ headers (only a Python
// module), so this implements it: the SSE4.2 crc32 instruction when compiled
// for it (x86-64-v3 has it; ~10+ GB/s), else the standard table-driven
// version (~0.5 GB/s), which also serves as the test reference.
#pragma once

#include <cstdint>
#include <span>

namespace troupe {

// CRC32C of `bytes`. Pass a previous result as `crc` to extend it over a
// further buffer: Crc32c(b, Crc32c(a)) == Crc32c(a ++ b).
// Check value: Crc32c("123456789") == 0xE3069283.
uint32_t Crc32c(std::span<const uint8_t> bytes, uint32_t crc = 0);

// The portable byte-at-a-time table version (same results).
uint32_t Crc32cPortable(std::span<const uint8_t> bytes, uint32_t crc = 0);

}  // namespace troupe
