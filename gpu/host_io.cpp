#include "gpu/host_io.h"

#include <cstdint>

namespace troupe {
namespace {

template <typename Out>
std::vector<Out> ToHost(Backend& be, const Tensor& t) {
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<Out> out(n);
  switch (t.dtype()) {
    case DType::kF32: {
      std::vector<float> v(n);
      be.CopyToHost(v.data(), t);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(v[i]);
      break;
    }
    case DType::kF64: {
      std::vector<double> v(n);
      be.CopyToHost(v.data(), t);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(v[i]);
      break;
    }
    case DType::kBF16: {
      std::vector<BF16> v(n);
      be.CopyToHost(v.data(), t);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(v[i].ToFloat());
      break;
    }
    case DType::kI32: {
      std::vector<int32_t> v(n);
      be.CopyToHost(v.data(), t);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(v[i]);
      break;
    }
  }
  return out;
}

template <typename In>
void FromHost(Backend& be, Tensor& t, const std::vector<In>& values) {
  const size_t n = values.size();
  switch (t.dtype()) {
    case DType::kF32: {
      std::vector<float> v(values.begin(), values.end());
      be.CopyFromHost(t, v.data());
      break;
    }
    case DType::kF64: {
      std::vector<double> v(values.begin(), values.end());
      be.CopyFromHost(t, v.data());
      break;
    }
    case DType::kBF16: {
      std::vector<BF16> v(n);
      for (size_t i = 0; i < n; ++i) v[i] = BF16::FromFloat(static_cast<float>(values[i]));
      be.CopyFromHost(t, v.data());
      break;
    }
    case DType::kI32: {
      std::vector<int32_t> v(values.begin(), values.end());
      be.CopyFromHost(t, v.data());
      break;
    }
  }
}

}  // namespace

std::vector<double> ToHostDoubles(Backend& be, const Tensor& t) { return ToHost<double>(be, t); }
std::vector<float> ToHostFloats(Backend& be, const Tensor& t) { return ToHost<float>(be, t); }
void FromHostDoubles(Backend& be, Tensor& t, const std::vector<double>& v) { FromHost(be, t, v); }
void FromHostFloats(Backend& be, Tensor& t, const std::vector<float>& v) { FromHost(be, t, v); }

}  // namespace troupe
