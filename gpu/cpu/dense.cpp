// CPU dense algebra: matmul, grouped (per-expert) linear layers, elementwise
// arithmetic and column concatenation.
//
// Matmul dominates training time, so it goes to OpenBLAS. OpenBLAS's own
// threading would make the split of the K reduction (and so the rounding)
// depend on its thread count, so it is pinned to one thread and we parallelise
// ourselves over FIXED-size tiles of the output: every output element is then
// produced by the same single-threaded BLAS call, with the same arguments,
// whatever the OpenMP thread count.
#include <cblas.h>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/cpu/dispatch.h"

namespace troupe {
namespace {

// Output tiles. Big enough that BLAS's per-call packing of the other operand
// is a few percent of the flops, small enough to give 2-16 cores work.
// Thread-count independent by construction: never derive these from omp.
constexpr int64_t kRowTile = 128;
constexpr int64_t kColTile = 256;
using cpu::ForChunks;
using cpu::kChunk;  // elementwise chunks (dispatch.h)

void PinBlasToOneThread() {
  static const bool once = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

// One single-threaded row-major GEMM: c[M,N] = alpha op(a) op(b) + beta c.
void Gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, double beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(M),
              static_cast<int>(N), static_cast<int>(K), static_cast<float>(alpha), a, static_cast<int>(lda), b,
              static_cast<int>(ldb), static_cast<float>(beta), c, static_cast<int>(ldc));
}
void Gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(M),
              static_cast<int>(N), static_cast<int>(K), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

// c[M,N] = alpha op(a) op(b) + beta c on one thread, for the tile
// rows [i0, i1) x cols [j0, j1) of c. a is [M,K] ([K,M] if ta), b is [K,N]
// ([N,K] if tb), all contiguous; K == 0 degenerates to c = beta c.
template <typename T>
void GemmTile(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T* a, const T* b, double beta,
              T* c, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (i1 <= i0 || j1 <= j0) return;
  if (K == 0) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) c[i * N + j] = beta == 0.0 ? T(0) : static_cast<T>(beta * c[i * N + j]);
    return;
  }
  // Row i of op(a) starts at a + i*K (plain) or a + i (transposed, stride M).
  const T* at = ta ? a + i0 : a + i0 * K;
  const int64_t lda = ta ? M : K;
  // Column j of op(b) starts at b + j (plain, stride N) or b + j*K (transposed).
  const T* bt = tb ? b + j0 * K : b + j0;
  const int64_t ldb = tb ? K : N;
  Gemm(ta, tb, i1 - i0, j1 - j0, K, alpha, at, lda, bt, ldb, beta, c + i0 * N + j0, N);
}

// The tile grid depends on (M, N) only: row tiles when there are at least
// two of them, else column tiles, else one call.
template <typename T>
void GemmParallel(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T* a, const T* b, double beta,
                  T* c) {
  if (M == 0 || N == 0) return;
  PinBlasToOneThread();
  if (M >= 2 * kRowTile) {
    const int64_t tiles = (M + kRowTile - 1) / kRowTile;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t)
      GemmTile(ta, tb, M, N, K, alpha, a, b, beta, c, t * kRowTile, std::min(M, (t + 1) * kRowTile), 0, N);
  } else {
    const int64_t tiles = (N + kColTile - 1) / kColTile;
#pragma omp parallel for schedule(static) if (tiles > 1)
    for (int64_t t = 0; t < tiles; ++t)
      GemmTile(ta, tb, M, N, K, alpha, a, b, beta, c, 0, M, t * kColTile, std::min(N, (t + 1) * kColTile));
  }
}

// One unit of grouped work: expert e, rows [r0, r1) of the relevant output.
struct GroupTask {
  int64_t e, r0, r1;
};

// Row tiles of every expert's slice [offsets[e], offsets[e+1]), in expert order.
std::vector<GroupTask> ExpertRowTasks(const int32_t* offsets, int64_t n_experts) {
  std::vector<GroupTask> tasks;
  for (int64_t e = 0; e < n_experts; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += kRowTile)
      tasks.push_back({e, r, std::min<int64_t>(offsets[e + 1], r + kRowTile)});
  return tasks;
}

template <typename T>
void GroupedLinearForwardImpl(Tensor& out, const Tensor& in, const Tensor& w, const int32_t* offsets) {
  const int64_t E = w.dim(0), O = w.dim(1), I = w.dim(2);
  const T* x = in.data<T>();  // (R, I)
  const T* wp = w.data<T>();  // (E, O, I)
  T* y = out.data<T>();       // (R, O)
  PinBlasToOneThread();
  const std::vector<GroupTask> tasks = ExpertRowTasks(offsets, E);
#pragma omp parallel for schedule(static)
  for (size_t t = 0; t < tasks.size(); ++t) {
    const GroupTask& k = tasks[t];
    // y[r0:r1] = x[r0:r1] @ w[e]^T
    Gemm(false, true, k.r1 - k.r0, O, I, 1.0, x + k.r0 * I, I, wp + k.e * O * I, I, 0.0, y + k.r0 * O, O);
  }
}

template <typename T>
void GroupedLinearBackwardImpl(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                               const int32_t* offsets) {
  const int64_t E = w.dim(0), O = w.dim(1), I = w.dim(2);
  const T* x = in.data<T>();                        // (R, I)
  const T* wp = w.data<T>();                        // (E, O, I)
  const T* dy = dout.data<T>();                     // (R, O)
  T* dx = din.defined() ? din.data<T>() : nullptr;  // (R, I)
  T* dwp = dw.defined() ? dw.data<T>() : nullptr;   // (E, O, I)
  PinBlasToOneThread();
  // din[r0:r1] += dout[r0:r1] @ w[e]: rows are independent.
  const std::vector<GroupTask> row_tasks = dx ? ExpertRowTasks(offsets, E) : std::vector<GroupTask>{};
#pragma omp parallel for schedule(static)
  for (size_t t = 0; t < row_tasks.size(); ++t) {
    const GroupTask& k = row_tasks[t];
    Gemm(false, false, k.r1 - k.r0, I, O, 1.0, dy + k.r0 * O, O, wp + k.e * O * I, I, 1.0, dx + k.r0 * I, I);
  }
  // dw[e][o0:o1] += dout_e[:, o0:o1]^T @ in_e: the sum over the expert's rows
  // stays inside one BLAS call, so tiles are over O (never over rows).
  std::vector<GroupTask> w_tasks;
  for (int64_t e = 0; dwp && e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    for (int64_t o = 0; o < O; o += kRowTile) w_tasks.push_back({e, o, std::min(O, o + kRowTile)});
  }
#pragma omp parallel for schedule(static)
  for (size_t t = 0; t < w_tasks.size(); ++t) {
    const GroupTask& k = w_tasks[t];
    const int64_t n = offsets[k.e + 1] - offsets[k.e];
    const int64_t r = offsets[k.e];
    Gemm(true, false, k.r1 - k.r0, I, n, 1.0, dy + r * O + k.r0, O, x + r * I, I, 1.0, dwp + k.e * O * I + k.r0 * I, I);
  }
}

}  // namespace

void CpuBackend::Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
                        double beta) {
  const int64_t M = c.rows(), N = c.cols();
  const int64_t K = trans_a ? a.rows() : a.cols();
  assert(a.dtype() == c.dtype() && b.dtype() == c.dtype());
  assert((trans_a ? a.cols() : a.rows()) == M);
  assert((trans_b ? b.cols() : b.rows()) == K && (trans_b ? b.rows() : b.cols()) == N);
  cpu::DispatchFloat(c.dtype(), [&](auto tag) {
    using T = decltype(tag);
    GemmParallel<T>(trans_a, trans_b, M, N, K, alpha, a.data<T>(), b.data<T>(), beta, c.data<T>());
  });
}

void CpuBackend::GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  assert(offsets.dtype() == DType::kI32 && offsets.numel() == w.dim(0) + 1);
  assert(in.cols() == w.dim(2) && out.cols() == w.dim(1) && out.rows() == in.rows());
  const int32_t* off = offsets.data<int32_t>();
  // Rows no expert owns (past offsets[E]) are left as they are.
  cpu::DispatchFloat(out.dtype(), [&](auto tag) { GroupedLinearForwardImpl<decltype(tag)>(out, in, w, off); });
}

void CpuBackend::GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                                       const Tensor& offsets) {
  assert(offsets.dtype() == DType::kI32 && offsets.numel() == w.dim(0) + 1);
  assert((!dw.defined() || dw.numel() == w.numel()) && (!din.defined() || din.numel() == in.numel()));
  const int32_t* off = offsets.data<int32_t>();
  cpu::DispatchFloat(dout.dtype(),
                     [&](auto tag) { GroupedLinearBackwardImpl<decltype(tag)>(din, dw, dout, in, w, off); });
}

// ---- elementwise -------------------------------------------------------------

void CpuBackend::Add(Tensor& out, const Tensor& a, const Tensor& b) {
  assert(out.numel() == a.numel() && out.numel() == b.numel());
  cpu::DispatchFloat(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* o = out.data<T>();  // may alias a or b: each element is read before it is written
    const T* x = a.data<T>();
    const T* y = b.data<T>();
    ForChunks(out.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = x[i] + y[i];
    });
  });
}

void CpuBackend::Axpy(Tensor& y, double alpha, const Tensor& x) {
  assert(y.numel() == x.numel() && y.dtype() == x.dtype());
  cpu::DispatchFloat(y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* yp = y.data<T>();
    const T* xp = x.data<T>();
    const T al = static_cast<T>(alpha);
    ForChunks(y.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) yp[i] += al * xp[i];
    });
  });
}

void CpuBackend::Scale(Tensor& x, double alpha) {
  cpu::DispatchFloat(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.data<T>();
    const T al = static_cast<T>(alpha);
    ForChunks(x.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) xp[i] *= al;
    });
  });
}

void CpuBackend::ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t N = out.rows(), A = a.cols(), B = b.cols();
  assert(a.rows() == N && b.rows() == N && out.cols() == A + B);
  cpu::DispatchFloat(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* o = out.data<T>();       // (N, A+B)
    const T* ap = a.data<T>();  // (N, A)
    const T* bp = b.data<T>();  // (N, B)
#pragma omp parallel for schedule(static) if (N * (A + B) > kChunk)
    for (int64_t n = 0; n < N; ++n) {
      std::memcpy(o + n * (A + B), ap + n * A, sizeof(T) * A);
      std::memcpy(o + n * (A + B) + A, bp + n * B, sizeof(T) * B);
    }
  });
}

void CpuBackend::ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) {
  const int64_t N = dout.rows(), A = da.cols(), B = db.cols();
  assert(da.rows() == N && db.rows() == N && dout.cols() == A + B);
  cpu::DispatchFloat(dout.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* g = dout.data<T>();  // (N, A+B)
    T* ga = da.data<T>();         // (N, A)
    T* gb = db.data<T>();         // (N, B)
#pragma omp parallel for schedule(static) if (N * (A + B) > kChunk)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < A; ++j) ga[n * A + j] += g[n * (A + B) + j];
      for (int64_t j = 0; j < B; ++j) gb[n * B + j] += g[n * (A + B) + A + j];
    }
  });
}

}  // namespace troupe
