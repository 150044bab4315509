// CPU normalisation, activations, embedding and the cross-entropy loss.
//
// Forward/backward pairs, llm.c style. Row-wise work is parallel over rows;
// reductions over rows (RMSNorm's dw, the embedding gradient) are parallel
// over fixed column tiles and sequential over rows, so each output element is
// summed in row order by one thread whatever the thread count. Per-row sums
// accumulate in double: it costs little here and keeps F32 close to F64.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/cpu/dispatch.h"

namespace troupe {
namespace {

constexpr int64_t kColTile = 64;   // columns per task in row reductions
using cpu::ForChunks;
using cpu::kChunk;  // elements per task in elementwise ops

template <typename T>
T Sigmoid(T x) {
  // Never exponentiate a large positive number: exp(-|x|) is in (0, 1].
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

}  // namespace

// ---- RMSNorm -----------------------------------------------------------------

void CpuBackend::RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) {
  const int64_t N = in.rows(), C = in.cols();
  assert(out.numel() == in.numel() && w.numel() == C && rstd.numel() == N);
  cpu::DispatchFloat(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();  // (N, C)
    const T* wp = w.data<T>();  // (C)
    T* y = out.data<T>();       // (N, C)
    T* rs = rstd.data<T>();     // (N)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = x + n * C;
      double ss = 0.0;
      for (int64_t j = 0; j < C; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const T r = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(C) + eps));
      rs[n] = r;  // backward uses exactly this value
      for (int64_t j = 0; j < C; ++j) y[n * C + j] = xr[j] * r * wp[j];
    }
  });
}

// With xh = x * rstd and g = dout * w:
//   din = rstd * (g - xh * mean(g * xh)),   dw = sum_n dout * xh.
void CpuBackend::RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                                 const Tensor& rstd) {
  const int64_t N = in.rows(), C = in.cols();
  assert(din.numel() == in.numel() && dout.numel() == in.numel() && dw.numel() == C && rstd.numel() == N);
  cpu::DispatchFloat(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();     // (N, C)
    const T* wp = w.data<T>();     // (C)
    const T* dy = dout.data<T>();  // (N, C)
    const T* rs = rstd.data<T>();  // (N)
    T* dx = din.data<T>();         // (N, C)
    T* dwp = dw.data<T>();         // (C)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = x + n * C;
      const T* gr = dy + n * C;
      const double r = rs[n];
      double dot = 0.0;  // sum_j g_j * xh_j
      for (int64_t j = 0; j < C; ++j) dot += static_cast<double>(gr[j]) * wp[j] * xr[j] * r;
      const double mean = dot / static_cast<double>(C);
      for (int64_t j = 0; j < C; ++j) {
        const double g = static_cast<double>(gr[j]) * wp[j];
        dx[n * C + j] += static_cast<T>(r * (g - static_cast<double>(xr[j]) * r * mean));
      }
    }
    // dw: tiles of columns, rows summed in order inside each tile.
    const int64_t tiles = (C + kColTile - 1) / kColTile;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t j0 = t * kColTile, j1 = std::min(C, j0 + kColTile);
      double acc[kColTile] = {};
      for (int64_t n = 0; n < N; ++n) {
        const double r = rs[n];
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(dy[n * C + j]) * x[n * C + j] * r;
      }
      for (int64_t j = j0; j < j1; ++j) dwp[j] += static_cast<T>(acc[j - j0]);
    }
  });
}

// ---- SwiGLU and sigmoid --------------------------------------------------------

void CpuBackend::SwiGluForward(Tensor& out, const Tensor& gate_up) {
  const int64_t N = gate_up.rows(), F = gate_up.cols() / 2;
  assert(gate_up.cols() == 2 * F && out.rows() == N && out.cols() == F);
  cpu::DispatchFloat(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* gu = gate_up.data<T>();  // (N, 2F): gate | up
    T* y = out.data<T>();             // (N, F)
#pragma omp parallel for schedule(static) if (N * F > kChunk)
    for (int64_t n = 0; n < N; ++n) {
      const T* g = gu + n * 2 * F;
      const T* u = g + F;
      for (int64_t j = 0; j < F; ++j) y[n * F + j] = g[j] * Sigmoid(g[j]) * u[j];
    }
  });
}

// silu(g) = g s, s = sigmoid(g);  silu'(g) = s (1 + g (1 - s)).
void CpuBackend::SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) {
  const int64_t N = gate_up.rows(), F = gate_up.cols() / 2;
  assert(dgate_up.numel() == gate_up.numel() && dout.rows() == N && dout.cols() == F);
  cpu::DispatchFloat(dout.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* gu = gate_up.data<T>();  // (N, 2F)
    const T* dy = dout.data<T>();     // (N, F)
    T* dgu = dgate_up.data<T>();      // (N, 2F)
#pragma omp parallel for schedule(static) if (N * F > kChunk)
    for (int64_t n = 0; n < N; ++n) {
      const T* g = gu + n * 2 * F;
      const T* u = g + F;
      T* dg = dgu + n * 2 * F;
      T* du = dg + F;
      for (int64_t j = 0; j < F; ++j) {
        const T s = Sigmoid(g[j]);
        dg[j] += dy[n * F + j] * u[j] * s * (T(1) + g[j] * (T(1) - s));
        du[j] += dy[n * F + j] * g[j] * s;
      }
    }
  });
}

void CpuBackend::SigmoidForward(Tensor& out, const Tensor& in) {
  assert(out.numel() == in.numel());
  cpu::DispatchFloat(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();
    T* y = out.data<T>();
    ForChunks(in.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) y[i] = Sigmoid(x[i]);
    });
  });
}

void CpuBackend::SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) {
  assert(din.numel() == out.numel() && dout.numel() == out.numel());
  cpu::DispatchFloat(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* y = out.data<T>();
    const T* dy = dout.data<T>();
    T* dx = din.data<T>();
    ForChunks(out.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dx[i] += dy[i] * y[i] * (T(1) - y[i]);
    });
  });
}

// ---- embedding -------------------------------------------------------------------

void CpuBackend::EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) {
  const int64_t N = tokens.numel(), D = table.cols();
  assert(tokens.dtype() == DType::kI32 && out.rows() == N && out.cols() == D);
  const int32_t* tok = tokens.data<int32_t>();  // (N)
  const size_t row_bytes = static_cast<size_t>(D) * DTypeSize(table.dtype());
  const char* src = static_cast<const char*>(table.raw());  // (V, D)
  char* dst = static_cast<char*>(out.raw());                 // (N, D)
#pragma omp parallel for schedule(static) if (N * D > kChunk)
  for (int64_t n = 0; n < N; ++n) {
    assert(tok[n] >= 0 && tok[n] < table.rows());
    std::memcpy(dst + n * row_bytes, src + static_cast<int64_t>(tok[n]) * row_bytes, row_bytes);
  }
}

// dtable[tokens[n]] += dout[n]. A token may repeat, so rows are NOT
// independent: tasks are column tiles, each walking the tokens in order.
void CpuBackend::EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) {
  const int64_t N = tokens.numel(), D = dtable.cols();
  assert(tokens.dtype() == DType::kI32 && dout.rows() == N && dout.cols() == D);
  const int32_t* tok = tokens.data<int32_t>();
  cpu::DispatchFloat(dout.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* dy = dout.data<T>();  // (N, D)
    T* dt = dtable.data<T>();      // (V, D)
    const int64_t tiles = (D + kColTile - 1) / kColTile;
#pragma omp parallel for schedule(static) if (N * D > kChunk)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t j0 = t * kColTile, j1 = std::min(D, j0 + kColTile);
      for (int64_t n = 0; n < N; ++n) {
        T* row = dt + static_cast<int64_t>(tok[n]) * D;
        for (int64_t j = j0; j < j1; ++j) row[j] += dy[n * D + j];
      }
    }
  });
}

// ---- cross-entropy -----------------------------------------------------------------

namespace {

// max and log(sum exp(x - max)) of one row, in double.
template <typename T>
void RowLogSumExp(const T* x, int64_t V, double* max_out, double* lse_out) {
  double mx = -INFINITY;
  for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(x[j]));
  double s = 0.0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<double>(x[j]) - mx);
  *max_out = mx;
  *lse_out = mx + std::log(s);
}

}  // namespace

void CpuBackend::CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) {
  const int64_t N = logits.rows(), V = logits.cols();
  assert(targets.dtype() == DType::kI32 && targets.numel() == N && losses.numel() == N);
  const int32_t* tgt = targets.data<int32_t>();
  cpu::DispatchFloat(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();  // (N, V)
    T* loss = losses.data<T>();     // (N)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      if (tgt[n] < 0) {
        loss[n] = T(0);
        continue;
      }
      assert(tgt[n] < V);
      double mx, lse;
      RowLogSumExp(x + n * V, V, &mx, &lse);
      loss[n] = static_cast<T>(lse - static_cast<double>(x[n * V + tgt[n]]));
    }
  });
}

void CpuBackend::CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) {
  const int64_t N = logits.rows(), V = logits.cols();
  assert(targets.dtype() == DType::kI32 && targets.numel() == N && dlogits.numel() == logits.numel());
  const int32_t* tgt = targets.data<int32_t>();
  cpu::DispatchFloat(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();  // (N, V)
    T* dx = dlogits.data<T>();      // (N, V), may be x itself
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = x + n * V;
      T* dr = dx + n * V;
      if (tgt[n] < 0) {
        std::fill(dr, dr + V, T(0));
        continue;
      }
      double mx, lse;
      RowLogSumExp(xr, V, &mx, &lse);  // reads the whole row before any write
      for (int64_t j = 0; j < V; ++j) {
        const double p = std::exp(static_cast<double>(xr[j]) - lse);
        dr[j] = static_cast<T>(dloss * (p - (j == tgt[n] ? 1.0 : 0.0)));
      }
    }
  });
}

}  // namespace troupe
