// Payload codec: cereal PortableBinary encoding of protocol structs.
//
//   Serialize<T>(value)   -> bytes  (cereal::PortableBinaryOutputArchive,
//                                    little-endian, 1-byte endianness prefix)
//   Deserialize<T>(bytes) -> Expected<T>
//
// Deserialize reads the PortableBinary format through BoundedInputArchive, a
// drop-in twin of cereal::PortableBinaryInputArchive that refuses any
// container length larger than the bytes left in the input. Without that, a
// hostile 8-byte length of 2^40 makes cereal's vector/string loaders resize()
// (allocate and zero) a terabyte before noticing the input is short. The one
// cost: a container of empty structs longer than its remaining input is
// refused (each element must take at least one byte). It also refuses
// trailing bytes after the value. Every cereal or std exception (including
// bad_alloc) becomes Status::Corruption; none escapes.
//
// A type is serializable as with any cereal archive: a member or free
// `template <class Archive> void serialize(Archive& ar)` (do not write
// overloads for the concrete PortableBinary archive types: the input side
// uses BoundedInputArchive). std::string, std::vector, std::map, std::optional
// and friends work through the usual <cereal/types/...> headers.
#pragma once

#include <cereal/archives/portable_binary.hpp>
#include <cereal/cereal.hpp>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::transport {

// A PortableBinary input archive over a byte span, with a size budget.
class BoundedInputArchive : public cereal::InputArchive<BoundedInputArchive, cereal::AllowEmptyClassElision> {
 public:
  // Reads the endianness byte written by PortableBinaryOutputArchive.
  explicit BoundedInputArchive(std::span<const uint8_t> bytes)
      : cereal::InputArchive<BoundedInputArchive, cereal::AllowEmptyClassElision>(this), bytes_(bytes) {
    uint8_t little = 1;
    LoadBinary<1>(&little, 1);
    if (little > 1) throw cereal::Exception("bad endianness byte " + std::to_string(little));
    swap_ = (little == 1) != IsLittleEndianHost();
  }

  // Copies `size` bytes, swapping each DataSize-byte element if needed.
  template <size_t DataSize>
  void LoadBinary(void* data, size_t size) {
    if (size > remaining()) {
      throw cereal::Exception("need " + std::to_string(size) + " bytes, " + std::to_string(remaining()) + " left");
    }
    if (size) std::memcpy(data, bytes_.data() + pos_, size);
    pos_ += size;
    if (swap_ && DataSize > 1) {
      auto* p = static_cast<uint8_t*>(data);
      for (size_t i = 0; i + DataSize <= size; i += DataSize) {
        for (size_t a = 0, b = DataSize - 1; a < b; ++a, --b) std::swap(p[i + a], p[i + b]);
      }
    }
  }

  // A container length: must not exceed the bytes that are left.
  void CheckContainerSize(uint64_t n) const {
    if (n > remaining()) {
      throw cereal::Exception("container length " + std::to_string(n) + " exceeds the " + std::to_string(remaining()) +
                              " bytes left");
    }
  }

  size_t remaining() const { return bytes_.size() - pos_; }

 private:
  static bool IsLittleEndianHost() {
    const uint16_t one = 1;
    uint8_t first;
    std::memcpy(&first, &one, 1);
    return first == 1;
  }
  std::span<const uint8_t> bytes_;
  size_t pos_ = 0;
  bool swap_ = false;
};

// Arithmetic values (bool separately: a byte other than 0/1 loaded into a
// bool is undefined behaviour, so it is refused).
template <class T>
inline std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool>> CEREAL_LOAD_FUNCTION_NAME(
    BoundedInputArchive& ar, T& t) {
  ar.template LoadBinary<sizeof(T)>(std::addressof(t), sizeof(t));
}
inline void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, bool& b) {
  uint8_t byte = 0;
  ar.template LoadBinary<1>(&byte, 1);
  if (byte > 1) throw cereal::Exception("bool byte " + std::to_string(byte) + " is neither 0 nor 1");
  b = byte == 1;
}
// Names are not stored in binary archives.
template <class T>
inline void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, cereal::NameValuePair<T>& t) {
  ar(t.value);
}
// Container sizes: the budget check that PortableBinaryInputArchive lacks.
template <class T>
inline void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, cereal::SizeTag<T>& t) {
  uint64_t n = 0;
  ar(n);
  ar.CheckContainerSize(n);
  t.size = static_cast<std::remove_reference_t<T>>(n);
}
// Contiguous binary blocks (vectors/arrays of arithmetic types).
template <class T>
inline void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, cereal::BinaryData<T>& bd) {
  using TT = std::remove_pointer_t<T>;
  ar.template LoadBinary<sizeof(TT)>(bd.data, static_cast<size_t>(bd.size));
}

// Encodes `value` with cereal::PortableBinaryOutputArchive (little-endian).
// Never throws for types whose serialize() does not throw.
template <class T>
std::vector<uint8_t> Serialize(const T& value) {
  std::ostringstream os(std::ios::binary);
  {
    cereal::PortableBinaryOutputArchive ar(os, cereal::PortableBinaryOutputArchive::Options::LittleEndian());
    ar(value);
  }
  const std::string s = std::move(os).str();
  return std::vector<uint8_t>(s.begin(), s.end());
}

// Decodes a T written by Serialize<T>. Corruption (naming the type-agnostic
// reason) on short input, oversized container lengths, bad endianness byte,
// trailing bytes, or any exception thrown while loading.
template <class T>
Expected<T> Deserialize(std::span<const uint8_t> bytes) {
  try {
    T value{};
    BoundedInputArchive ar(bytes);
    ar(value);
    if (ar.remaining() != 0) {
      return Status::Corruption("codec: " + std::to_string(ar.remaining()) + " trailing bytes after the value");
    }
    return value;
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("codec: ") + e.what());
  } catch (...) {
    return Status::Corruption("codec: unknown exception while decoding");
  }
}

}  // namespace troupe::transport

CEREAL_REGISTER_ARCHIVE(troupe::transport::BoundedInputArchive)
namespace cereal::traits::detail {
// Lets load_minimal types find their output archive (PortableBinary writes).
template <>
struct get_output_from_input<troupe::transport::BoundedInputArchive> {
  using type = cereal::PortableBinaryOutputArchive;
};
}  // namespace cereal::traits::detail
