// Internal to gpu/cpu: run a kernel template for the tensor's float dtype,
// and split elementwise work into fixed, thread-count independent chunks.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>
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

// Elementwise ops run over fixed chunks so each element sees the same code
// path (vector body vs scalar tail), and so the same rounding, for any thread
// count. Never derive this from the OpenMP thread count.
inline constexpr int64_t kChunk = 8192;

// fn(begin, end) over the fixed chunks of [0, n), in parallel when there is
// more than one.
template <typename Fn>
void ForChunks(int64_t n, Fn&& fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) fn(c * kChunk, std::min(n, (c + 1) * kChunk));
}

}  // namespace troupe::cpu
