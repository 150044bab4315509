// The wire envelope of every Troupe transport frame.
//
// Layout (16-byte header, all integers little-endian, then the payload):
//
//   offset  size  field
//   0       4     magic      0x54525045 ('TRPE' as a u32; bytes 45 50 52 54)
//   4       2     version    kProtocolVersion (1); other versions are refused
//   6       2     type       message type (see messages.h for the numbering)
//   8       4     length     payload length in bytes, <= kMaxPayloadBytes
//   12      4     crc32c     CRC32C (Castagnoli) of the payload bytes
//   16      len   payload    usually a codec.h (cereal PortableBinary) blob
//
// On a socket a frame is one ZeroMQ part holding the layout above, or, for
// large payloads (never copied to prepend the header), two parts: header,
// then payload, whose concatenation is the layout above. DecodeFrame never trusts its input: every hostile
// byte string yields Status::Corruption naming the problem, never a crash.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace troupe::transport {

inline constexpr uint32_t kFrameMagic = 0x54525045;  // 'TRPE'
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 16;
inline constexpr uint32_t kMaxPayloadBytes = 1u << 30;  // 1 GiB

// The decoded 16-byte header.
struct FrameHeader {
  uint16_t version = kProtocolVersion;
  uint16_t type = 0;
  uint32_t payload_bytes = 0;
  uint32_t crc32c = 0;
};

// One decoded frame: its type and its (checksum-verified) payload.
struct Frame {
  uint16_t type = 0;
  std::vector<uint8_t> payload;
};

// The 16-byte header for `payload` (computes its CRC32C). Precondition:
// payload.size() <= kMaxPayloadBytes (larger payloads are a caller bug; the
// socket Send functions check it and return InvalidArgument).
std::array<uint8_t, kFrameHeaderBytes> EncodeFrameHeader(uint16_t type, std::span<const uint8_t> payload);

// Header followed by payload, in one buffer (copies the payload).
std::vector<uint8_t> EncodeFrame(uint16_t type, std::span<const uint8_t> payload);

// Parses and validates a header on its own: exactly kFrameHeaderBytes bytes,
// magic, version, payload_bytes <= kMaxPayloadBytes. The CRC is not checked
// here (there is no payload yet).
Expected<FrameHeader> DecodeFrameHeader(std::span<const uint8_t> header);

// Checks `payload` against a decoded header: length and CRC32C.
Status VerifyPayload(const FrameHeader& header, std::span<const uint8_t> payload);

// Decodes a whole frame (header + payload in one buffer). Corruption on:
// truncated header, bad magic, unsupported version, payload too large,
// length mismatch (fewer or more bytes than the header says), CRC mismatch.
Expected<Frame> DecodeFrame(std::span<const uint8_t> bytes);

// Decodes a frame that arrived as two parts (header, payload); same checks.
Expected<Frame> DecodeFrameParts(std::span<const uint8_t> header, std::span<const uint8_t> payload);

}  // namespace troupe::transport
