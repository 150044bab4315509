// libFuzzer harness: hostile bytes into the frame envelope and the codec.
//
// Per input it checks three things, none of which may crash, hang, leak or
// allocate without bound (libFuzzer's -malloc_limit_mb catches the latter):
//   1. DecodeFrame(bytes): Ok or Corruption; an Ok frame re-encodes to the
//      same bytes.
//   2. Deserialize<T>(bytes[1:]) for the protocol message T picked by
//      bytes[0]; an Ok value survives Serialize -> Deserialize unchanged.
//   3. EncodeFrame(type, bytes) always decodes back to (type, bytes).
// Built with clang++ -fsanitize=fuzzer,address,undefined (tests/fuzz/CMakeLists.txt).
#include <cereal/types/map.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "actors/transport/codec.h"
#include "actors/transport/envelope.h"
#include "actors/transport/messages.h"

namespace {

using namespace troupe::transport;

// Containers of every shape cereal loads differently (binary block, nested,
// associative, optional), standing in for the cluster layer's messages.
struct Nested {
  std::vector<float> values;
  std::map<std::string, std::vector<uint32_t>> table;
  std::optional<std::string> note;
  std::vector<std::string> names;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(values, table, note, names);
  }
};

#define TROUPE_CHECK(cond)     \
  do {                         \
    if (!(cond)) std::abort(); \
  } while (0)

template <class T>
void FuzzMessage(std::span<const uint8_t> bytes) {
  auto value = Deserialize<T>(bytes);
  if (!value.ok()) {
    TROUPE_CHECK(value.status().IsCorruption());
    return;
  }
  // A successful decode consumed every byte, so re-encoding reproduces them
  // (modulo the endianness byte, which is always 1 when we write).
  const auto again = Serialize(value.value());
  auto twice = Deserialize<T>(again);
  TROUPE_CHECK(twice.ok());
  TROUPE_CHECK(Serialize(twice.value()) == again);
}

void FuzzPayload(uint8_t selector, std::span<const uint8_t> bytes) {
  switch (selector % 6) {
    case 0:
      FuzzMessage<Hello>(bytes);
      break;
    case 1:
      FuzzMessage<Welcome>(bytes);
      break;
    case 2:
      FuzzMessage<Heartbeat>(bytes);
      break;
    case 3:
      FuzzMessage<ErrorReply>(bytes);
      break;
    case 4:
      FuzzMessage<Goodbye>(bytes);
      break;
    default:
      FuzzMessage<Nested>(bytes);
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);

  // 1. The envelope.
  auto frame = DecodeFrame(bytes);
  if (frame.ok()) {
    TROUPE_CHECK(EncodeFrame(frame->type, frame->payload) == std::vector<uint8_t>(bytes.begin(), bytes.end()));
    FuzzPayload(static_cast<uint8_t>(frame->type), frame->payload);
  } else {
    TROUPE_CHECK(frame.status().IsCorruption());
  }

  // 2. The codec, straight (a valid CRC is too rare to reach it through 1).
  if (size >= 1) FuzzPayload(data[0], bytes.subspan(1));

  // 3. Encode -> decode is the identity.
  const uint16_t type = size >= 2 ? static_cast<uint16_t>(data[0] | (data[1] << 8)) : 0;
  auto round = DecodeFrame(EncodeFrame(type, bytes));
  TROUPE_CHECK(round.ok() && round->type == type && round->payload == std::vector<uint8_t>(bytes.begin(), bytes.end()));
  return 0;
}
