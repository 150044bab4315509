// CPU reductions (for the loss and the global gradient norm) and AdamW.
//
// Sums are deterministic: the tensor is cut into fixed chunks, each chunk is
// summed in double by one thread, and the chunk partials are added in index
// order on one thread. The chunk size is a constant, so the rounding is the
// same for any thread count.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/cpu/dispatch.h"

namespace troupe {
namespace {

using cpu::kChunk;  // elementwise chunks (dispatch.h)

// sum_i f(x[i]) in double, in a thread-count independent order.
template <typename T, typename F>
double ChunkedSum(const T* x, int64_t n, F f) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0.0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) s += f(static_cast<double>(x[i]));
    partial[c] = s;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

double CpuBackend::Sum(const Tensor& x) {
  double out = 0.0;
  cpu::DispatchFloat(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    out = ChunkedSum(x.data<T>(), x.numel(), [](double v) { return v; });
  });
  return out;
}

double CpuBackend::SumSquares(const Tensor& x) {
  double out = 0.0;
  cpu::DispatchFloat(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    out = ChunkedSum(x.data<T>(), x.numel(), [](double v) { return v * v; });
  });
  return out;
}

// Elementwise; the update is computed in double and rounded once into the
// stored dtype.
void CpuBackend::AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) {
  const int64_t n = param.numel();
  assert(grad.numel() == n && m.numel() == n && v.numel() == n && p.step >= 1);
  const double b1 = p.beta1, b2 = p.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(p.step));  // bias corrections
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(p.step));
  cpu::DispatchFloat(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* w = param.data<T>();
    const T* g = grad.data<T>();
    T* mp = m.data<T>();
    T* vp = v.data<T>();
    // Fixed chunks, so each element takes the same (vector or scalar) code
    // path, and so the same rounding, for any thread count.
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const double gi = p.grad_scale * static_cast<double>(g[i]);
        const double mi = b1 * static_cast<double>(mp[i]) + (1.0 - b1) * gi;
        const double vi = b2 * static_cast<double>(vp[i]) + (1.0 - b2) * gi * gi;
        mp[i] = static_cast<T>(mi);
        vp[i] = static_cast<T>(vi);
        const double mhat = mi / bc1, vhat = vi / bc2;
        const double wi = static_cast<double>(w[i]);
        w[i] = static_cast<T>(wi - p.lr * (mhat / (std::sqrt(vhat) + p.eps) + p.weight_decay * wi));
      }
    }
  });
}

}  // namespace troupe
