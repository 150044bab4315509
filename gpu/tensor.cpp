#include "gpu/tensor.h"

#include <cassert>
#include <stdexcept>

namespace troupe {

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
  }
  return 0;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF64: return "F64";
    case DType::kBF16: return "BF16";
    case DType::kI32: return "I32";
  }
  return "?";
}

Tensor::Tensor(std::shared_ptr<Buffer> buf, size_t offset_bytes, std::vector<int64_t> shape, DType dtype,
               std::string name)
    : buf_(std::move(buf)), offset_(offset_bytes), shape_(std::move(shape)), dtype_(dtype), name_(std::move(name)) {}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

int64_t Tensor::rows() const {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < shape_.size(); ++i) n *= shape_[i];
  return n;
}

Tensor Tensor::SliceRows(int64_t begin, int64_t end) const {
  assert(begin >= 0 && begin <= end && end <= rows());
  std::vector<int64_t> shape = {end - begin, cols()};
  return Tensor(buf_, offset_ + static_cast<size_t>(begin * cols()) * DTypeSize(dtype_), std::move(shape), dtype_,
                name_);
}

Tensor Tensor::Reshape(std::vector<int64_t> shape) const {
  Tensor t(buf_, offset_, std::move(shape), dtype_, name_);
  assert(t.numel() == numel());
  return t;
}

Tensor Tensor::Prefix(std::vector<int64_t> shape) const {
  Tensor t(buf_, offset_, std::move(shape), dtype_, name_);
  assert(t.numel() <= numel());
  return t;
}

Tensor Tensor::Select(int64_t i) const {
  assert(!shape_.empty() && i >= 0 && i < shape_[0]);
  std::vector<int64_t> shape(shape_.begin() + 1, shape_.end());
  int64_t inner = 1;
  for (int64_t s : shape) inner *= s;
  return Tensor(buf_, offset_ + static_cast<size_t>(i * inner) * DTypeSize(dtype_), std::move(shape), dtype_, name_);
}

std::string Tensor::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < shape_.size(); ++i) s += (i ? ", " : "") + std::to_string(shape_[i]);
  return s + "]";
}

}  // namespace troupe
