// Tensor: a typed, shaped, contiguous view into a device buffer.
//
// A Tensor never owns compute semantics; a Backend allocates its Buffer and
// runs operations on it. Views (SliceRows, Reshape) share the buffer. Shapes
// are row-major: the last dimension is contiguous.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace troupe {

enum class DType : uint8_t { kF32 = 0, kF64 = 1, kBF16 = 2, kI32 = 3 };
enum class DeviceKind : uint8_t { kCpu = 0, kCuda = 1 };

size_t DTypeSize(DType t);
const char* DTypeName(DType t);  // "F32", "F64", "BF16", "I32" (safetensors spelling)

// bf16 storage: the top 16 bits of an IEEE float, rounded to nearest even.
struct BF16 {
  uint16_t bits = 0;
  static BF16 FromFloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return BF16{static_cast<uint16_t>(u >> 16)};
  }
  float ToFloat() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// Raw device memory. Backends subclass it to free with the right allocator.
class Buffer {
 public:
  Buffer(void* ptr, size_t bytes, DeviceKind device) : ptr_(ptr), bytes_(bytes), device_(device) {}
  virtual ~Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* ptr() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  DeviceKind device() const { return device_; }

 private:
  void* ptr_;
  size_t bytes_;
  DeviceKind device_;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Buffer> buf, size_t offset_bytes, std::vector<int64_t> shape, DType dtype,
         std::string name = {});

  bool defined() const { return buf_ != nullptr; }
  DType dtype() const { return dtype_; }
  DeviceKind device() const { return buf_ ? buf_->device() : DeviceKind::kCpu; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const;
  size_t bytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  // Treat as a matrix: cols = last dimension, rows = product of the others.
  int64_t cols() const { return shape_.empty() ? 1 : shape_.back(); }
  int64_t rows() const;
  const std::string& name() const { return name_; }
  void set_name(std::string n) { name_ = std::move(n); }

  void* raw() const { return static_cast<char*>(buf_->ptr()) + offset_; }
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }

  // Rows [begin, end) of the matrix view; shares the buffer.
  Tensor SliceRows(int64_t begin, int64_t end) const;
  // Same elements, new shape (numel must match).
  Tensor Reshape(std::vector<int64_t> shape) const;
  // The first numel(shape) elements, viewed with `shape` (scratch reuse).
  Tensor Prefix(std::vector<int64_t> shape) const;
  // Index i along dimension 0, dropping it: t[i].
  Tensor Select(int64_t i) const;

  std::string ShapeString() const;  // "[4, 128]"

 private:
  std::shared_ptr<Buffer> buf_;
  size_t offset_ = 0;
  std::vector<int64_t> shape_;
  DType dtype_ = DType::kF32;
  std::string name_;
};

}  // namespace troupe
