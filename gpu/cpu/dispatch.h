// Internal to gpu/cpu: run a kernel template for the tensor's float dtype.
#pragma once

#include <cassert>
#include <cstdio>
#include <cstdlib>

#include "gpu/tensor.h"

namespace troupe::cpu {

// Calls fn(T{}) with T = float or double according to `dtype`. Any other dtype
// is a caller bug (the model never asks for it), so it aborts loudly.
template <typename Fn>
void DispatchFloat(DType dtype, Fn&& fn) {
  if (dtype == DType::kF32) {
    fn(float{});
  } else if (dtype == DType::kF64) {
    fn(double{});
  } else {
    std::fprintf(stderr, "troupe: internal error: CPU kernel called with dtype %s\n", DTypeName(dtype));
    std::abort();
  }
}

}  // namespace troupe::cpu
