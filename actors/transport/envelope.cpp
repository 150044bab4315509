// Frame envelope encode/decode: see envelope.h for the layout.
#include "actors/transport/envelope.h"

#include <cstdio>
#include <cstring>
#include <string>

#include "common/crc32c.h"
#include "common/little_endian.h"

namespace troupe::transport {
namespace {

std::string Hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08X", v);
  return buf;
}

}  // namespace

std::array<uint8_t, kFrameHeaderBytes> EncodeFrameHeader(uint16_t type, std::span<const uint8_t> payload) {
  std::array<uint8_t, kFrameHeaderBytes> h{};
  PutLe(h.data() + 0, kFrameMagic, 4);
  PutLe(h.data() + 4, kProtocolVersion, 2);
  PutLe(h.data() + 6, type, 2);
  PutLe(h.data() + 8, static_cast<uint32_t>(payload.size()), 4);
  PutLe(h.data() + 12, Crc32c(payload), 4);
  return h;
}

std::vector<uint8_t> EncodeFrame(uint16_t type, std::span<const uint8_t> payload) {
  const auto header = EncodeFrameHeader(type, payload);
  std::vector<uint8_t> out(kFrameHeaderBytes + payload.size());
  std::memcpy(out.data(), header.data(), kFrameHeaderBytes);
  if (!payload.empty()) std::memcpy(out.data() + kFrameHeaderBytes, payload.data(), payload.size());
  return out;
}

Expected<FrameHeader> DecodeFrameHeader(std::span<const uint8_t> header) {
  if (header.size() < kFrameHeaderBytes) {
    return Status::Corruption("frame: truncated header: " + std::to_string(header.size()) + " of " +
                              std::to_string(kFrameHeaderBytes) + " bytes");
  }
  if (header.size() > kFrameHeaderBytes) {
    return Status::Corruption("frame: header part is " + std::to_string(header.size()) + " bytes, expected " +
                              std::to_string(kFrameHeaderBytes));
  }
  const uint8_t* p = header.data();
  const uint32_t magic = static_cast<uint32_t>(GetLe(p, 4));
  if (magic != kFrameMagic)
    return Status::Corruption("frame: bad magic " + Hex(magic) + ", expected " + Hex(kFrameMagic));
  FrameHeader h;
  h.version = static_cast<uint16_t>(GetLe(p + 4, 2));
  if (h.version != kProtocolVersion) {
    return Status::Corruption("frame: unsupported protocol version " + std::to_string(h.version) +
                              " (this build speaks " + std::to_string(kProtocolVersion) + ")");
  }
  h.type = static_cast<uint16_t>(GetLe(p + 6, 2));
  h.payload_bytes = static_cast<uint32_t>(GetLe(p + 8, 4));
  if (h.payload_bytes > kMaxPayloadBytes) {
    return Status::Corruption("frame: payload too large: " + std::to_string(h.payload_bytes) + " bytes > max " +
                              std::to_string(kMaxPayloadBytes));
  }
  h.crc32c = static_cast<uint32_t>(GetLe(p + 12, 4));
  return h;
}

Status VerifyPayload(const FrameHeader& header, std::span<const uint8_t> payload) {
  if (payload.size() != header.payload_bytes) {
    return Status::Corruption("frame: length mismatch: header says " + std::to_string(header.payload_bytes) +
                              " payload bytes, got " + std::to_string(payload.size()));
  }
  const uint32_t crc = Crc32c(payload);
  if (crc != header.crc32c) {
    return Status::Corruption("frame: checksum mismatch: header " + Hex(header.crc32c) + ", payload " + Hex(crc));
  }
  return Status::Ok();
}

Expected<Frame> DecodeFrameParts(std::span<const uint8_t> header, std::span<const uint8_t> payload) {
  auto h = DecodeFrameHeader(header);
  if (!h.ok()) return h.status();
  TROUPE_RETURN_IF_ERROR(VerifyPayload(h.value(), payload));
  return Frame{h->type, std::vector<uint8_t>(payload.begin(), payload.end())};
}

Expected<Frame> DecodeFrame(std::span<const uint8_t> bytes) {
  if (bytes.size() < kFrameHeaderBytes) {
    return Status::Corruption("frame: truncated header: " + std::to_string(bytes.size()) + " of " +
                              std::to_string(kFrameHeaderBytes) + " bytes");
  }
  return DecodeFrameParts(bytes.first(kFrameHeaderBytes), bytes.subspan(kFrameHeaderBytes));
}

}  // namespace troupe::transport
