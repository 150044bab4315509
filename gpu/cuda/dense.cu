// CUDA dense algebra: cuBLAS GEMMs (plain and grouped per expert), elementwise
// arithmetic, column concatenation, deterministic reductions and AdamW.
//
// Row-major on a column-major library: a row-major [r, c] matrix is, to
// cuBLAS, the column-major [c, r] matrix with leading dimension c, i.e. its
// transpose. So row-major C = op(A) op(B) is computed as the column-major
// C^T = op(B)^T op(A)^T: swap the operands, keep each one's transpose flag,
// and pass (m, n, k) = (N, M, K) with leading dimensions = row-major cols.
//
// Precision (CudaBackend::precision()):
//   kFp32: CUBLAS_COMPUTE_32F under the handle's default math mode: true fp32
//          (TF32 is only used when the math mode or computeType asks for it).
//   kBf16: CUBLAS_COMPUTE_32F_FAST_16BF on the F32 tensors (inputs rounded to
//          bf16 on the tensor cores, fp32 accumulation and output). The
//          grouped GEMM documents no FAST_16BF support; we try it once and, if
//          cuBLAS refuses, use CUBLAS_COMPUTE_32F_FAST_TF32 (10-bit mantissa,
//          still fp32 in/out) for grouped calls from then on; see GroupedGemm.
//
// Determinism: cuBLAS GEMMs are deterministic for fixed shapes, pointers'
// alignment and handle settings (no atomics-based split-K by default). Sum
// and SumSquares reduce fixed chunks into double partials, then one block adds
// the partials in a fixed tree: the result never depends on scheduling.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <vector>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_util.cuh"

namespace troupe {
namespace {

using namespace cuda_util;  // the shared launch / check helpers

// Fails unless every dimension fits the 32-bit cuBLAS interface.
bool CublasDimsOk(CudaBackend& be, const char* op, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) {
    if (!FitsInt(d)) {
      be.Fail(op, "dimensions exceed the 32-bit cuBLAS interface");
      return false;
    }
  }
  return true;
}

// ---- elementwise kernels (LaunchForEach of kernel_util.cuh) -------------------

struct AddOp {  // may alias: each element is read before it is written
  float* out;
  const float* a;
  const float* b;
  __device__ void operator()(int64_t i) const { out[i] = a[i] + b[i]; }
};

struct AxpyOp {
  float* y;
  const float* x;
  float alpha;
  __device__ void operator()(int64_t i) const { y[i] += alpha * x[i]; }
};

struct ScaleOp {
  float* x;
  float alpha;
  __device__ void operator()(int64_t i) const { x[i] *= alpha; }
};

// The same update as CpuBackend::AdamWStep, in double, rounded once to F32.
struct AdamWOp {
  float* w;
  const float* g;
  float* m;
  float* v;
  double lr, b1, b2, eps, wd, grad_scale, bc1, bc2;
  __device__ void operator()(int64_t i) const {
    const double gi = grad_scale * static_cast<double>(g[i]);
    const double mi = b1 * static_cast<double>(m[i]) + (1.0 - b1) * gi;
    const double vi = b2 * static_cast<double>(v[i]) + (1.0 - b2) * gi * gi;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    const double mhat = mi / bc1, vhat = vi / bc2;
    const double wi = static_cast<double>(w[i]);
    w[i] = static_cast<float>(wi - lr * (mhat / (sqrt(vhat) + eps) + wd * wi));
  }
};

// out [N, A+B] = [a | b]: blockIdx.y strides over rows, x over columns.
__global__ void ConcatColsKernel(float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b,
                                 int64_t N, int64_t A, int64_t B) {
  const int64_t W = A + B;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y)
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < W;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      out[n * W + j] = j < A ? a[n * A + j] : b[n * B + (j - A)];
}

__global__ void ConcatColsBackwardKernel(float* __restrict__ da, float* __restrict__ db, const float* __restrict__ dout,
                                         int64_t N, int64_t A, int64_t B) {
  const int64_t W = A + B;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y)
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < W;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float g = dout[n * W + j];
      if (j < A) {
        da[n * A + j] += g;
      } else {
        db[n * B + (j - A)] += g;
      }
    }
}

// ---- deterministic reductions -------------------------------------------------

constexpr int64_t kSumChunk = 8192;  // elements per block: fixed, so the partials are too
constexpr int kSumThreads = 256;
constexpr int kFinalThreads = 1024;

// Sum of v over the block in a fixed tree (shuffles, then warp 0); the result
// is valid in thread 0. blockDim.x must be a multiple of 32, at most 1024.
__device__ double BlockSumDouble(double v) {
  __shared__ double warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    v = lane < n_warps ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

template <bool kSquare>
__global__ void PartialSumKernel(const float* __restrict__ x, int64_t n, double* __restrict__ partial) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSumChunk;
  const int64_t end = begin + kSumChunk < n ? begin + kSumChunk : n;
  double s = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const double v = static_cast<double>(x[i]);
    s += kSquare ? v * v : v;
  }
  s = BlockSumDouble(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void FinalSumKernel(const double* __restrict__ partial, int64_t count, double* __restrict__ out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
  s = BlockSumDouble(s);
  if (threadIdx.x == 0) *out = s;
}

template <bool kSquare>
double DeterministicSum(CudaBackend& be, const char* op, const Tensor& x) {
  if (be.failed() || !RequireF32(be, op, {&x})) return 0.0;
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  const int64_t chunks = CeilDiv(n, kSumChunk);
  if (chunks > INT_MAX) {
    be.Fail(op, "tensor too large");
    return 0.0;
  }
  auto* scratch = static_cast<double*>(be.Workspace(static_cast<size_t>(chunks + 1) * sizeof(double)));
  if (scratch == nullptr) return 0.0;
  double* result = scratch + chunks;
  PartialSumKernel<kSquare>
      <<<static_cast<unsigned>(chunks), kSumThreads, 0, be.stream()>>>(x.data<float>(), n, scratch);
  if (!LaunchOk(be, op)) return 0.0;
  FinalSumKernel<<<1, kFinalThreads, 0, be.stream()>>>(scratch, chunks, result);
  if (!LaunchOk(be, op)) return 0.0;
  double host = 0.0;
  if (!CudaOk(be, op, cudaMemcpyAsync(&host, result, sizeof(double), cudaMemcpyDeviceToHost, be.stream()),
              "cudaMemcpyAsync") ||
      !CudaOk(be, op, cudaStreamSynchronize(be.stream()), "cudaStreamSynchronize"))
    return 0.0;
  return host;
}

// ---- grouped GEMM ---------------------------------------------------------------

// One problem of a grouped call, in cuBLAS's column-major terms:
// C = op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n], C [m, n].
struct GemmProblem {
  cublasOperation_t ta, tb;
  int m, n, k;
  const float* a;
  int lda;
  const float* b;
  int ldb;
  float beta;
  float* c;
  int ldc;
};

// Set once cuBLAS has refused FAST_16BF for a grouped call (process-wide: the
// answer depends on the cuBLAS build, not on the backend instance).
std::atomic<bool> g_grouped_bf16_refused{false};

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Runs every problem in ONE cublasGemmGroupedBatchedEx call (one group of
// size 1 per problem: the problems differ in shape). Per the cuBLAS docs the
// pointer arrays (A, B, C) must be in device memory; everything else
// (transposes, m/n/k, leading dimensions, alpha/beta, group sizes) is read
// from host memory during the call, so std::vectors suffice for those.
void GroupedGemm(CudaBackend& be, const char* op, const std::vector<GemmProblem>& probs) {
  if (probs.empty() || be.failed()) return;
  const int count = static_cast<int>(probs.size());
  std::vector<cublasOperation_t> ta(count), tb(count);
  std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count), group_size(count, 1);
  std::vector<float> alpha(count, 1.0f), beta(count);
  std::vector<const void*> ptrs(3 * static_cast<size_t>(count));  // [A..., B..., C...]
  bool aligned = true;
  for (int i = 0; i < count; ++i) {
    const GemmProblem& p = probs[i];
    ta[i] = p.ta;
    tb[i] = p.tb;
    m[i] = p.m;
    n[i] = p.n;
    k[i] = p.k;
    lda[i] = p.lda;
    ldb[i] = p.ldb;
    ldc[i] = p.ldc;
    beta[i] = p.beta;
    ptrs[i] = p.a;
    ptrs[count + i] = p.b;
    ptrs[2 * count + i] = p.c;
    aligned = aligned && Aligned16(p.a) && Aligned16(p.b) && Aligned16(p.c);
  }
  // The device copy of the pointer arrays lives in the backend's workspace,
  // which stays valid until the next op queued on this stream (stream order
  // protects it from being overwritten before cuBLAS has read it).
  auto* dptrs = static_cast<const void**>(be.Workspace(ptrs.size() * sizeof(void*)));
  if (dptrs == nullptr) return;
  // From pageable memory: returns once `ptrs` has been staged, so the vector
  // may die when we return.
  if (!CudaOk(be, op,
              cudaMemcpyAsync(dptrs, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, be.stream()),
              "cudaMemcpyAsync(pointer arrays)"))
    return;
  const void* const* d_a = dptrs;
  const void* const* d_b = dptrs + count;
  void* const* d_c = const_cast<void* const*>(dptrs + 2 * count);

  auto call = [&](cublasComputeType_t compute) {
    return cublasGemmGroupedBatchedEx(be.cublas(), ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                      d_a, CUDA_R_32F, lda.data(), d_b, CUDA_R_32F, ldb.data(), beta.data(), d_c,
                                      CUDA_R_32F, ldc.data(), count, group_size.data(), compute);
  };
  // FAST compute types require 16-byte aligned matrices (cuBLAS docs); expert
  // slices of a row-major tensor are aligned only when the row length allows,
  // so unaligned calls use plain fp32 (more accurate, slower, always legal).
  if (be.precision() == MatmulPrecision::kBf16 && aligned) {
    if (!g_grouped_bf16_refused.load()) {
      const cublasStatus_t st = call(CUBLAS_COMPUTE_32F_FAST_16BF);
      if (st == CUBLAS_STATUS_SUCCESS) return;
      if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
        CublasOk(be, op, st, "cublasGemmGroupedBatchedEx(FAST_16BF)");
        return;
      }
      if (!g_grouped_bf16_refused.exchange(true)) {
        std::fprintf(stderr,
                     "troupe: cuBLAS refused FAST_16BF for grouped GEMM (%s); grouped GEMMs use FAST_TF32 instead\n",
                     cublasGetStatusString(st));
      }
    }
    CublasOk(be, op, call(CUBLAS_COMPUTE_32F_FAST_TF32), "cublasGemmGroupedBatchedEx(FAST_TF32)");
    return;
  }
  CublasOk(be, op, call(CUBLAS_COMPUTE_32F), "cublasGemmGroupedBatchedEx(32F)");
}

// Copies the E+1 expert offsets to the host (one small synchronous copy) and
// checks 0 <= offsets[0] <= ... <= offsets[E] <= rows.
bool ReadOffsets(CudaBackend& be, const char* op, const Tensor& offsets, int64_t n_experts, int64_t rows,
                 std::vector<int32_t>* out) {
  if (!Require(be, op, DType::kI32, {&offsets})) return false;
  if (!ShapeOk(
          be, op, offsets.numel() == n_experts + 1,
          "offsets has " + std::to_string(offsets.numel()) + " entries for " + std::to_string(n_experts) + " experts"))
    return false;
  out->resize(static_cast<size_t>(n_experts + 1));
  if (!CudaOk(be, op, cudaMemcpyAsync(out->data(), offsets.raw(), offsets.bytes(), cudaMemcpyDeviceToHost, be.stream()),
              "cudaMemcpyAsync(offsets)") ||
      !CudaOk(be, op, cudaStreamSynchronize(be.stream()), "cudaStreamSynchronize(offsets)"))
    return false;
  const std::vector<int32_t>& o = *out;
  bool ok = o[0] >= 0 && o[n_experts] <= rows;
  for (int64_t e = 0; ok && e < n_experts; ++e) ok = o[e] <= o[e + 1];
  if (!ok) {
    std::string s;
    for (int64_t e = 0; e <= n_experts && e < 17; ++e) s += (e ? "," : "") + std::to_string(o[e]);
    be.Fail(op, "offsets are not non-decreasing within [0, " + std::to_string(rows) + "]: " + s);
  }
  return ok;
}

}  // namespace

// ---- GEMM -----------------------------------------------------------------------

void CudaBackend::Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
                         double beta) {
  static const char* kOp = "Matmul";
  if (failed() || !RequireF32(*this, kOp, {&c, &a, &b})) return;
  const int64_t M = c.rows(), N = c.cols();
  const int64_t K = trans_a ? a.rows() : a.cols();
  if (!ShapeOk(*this, kOp,
               (trans_a ? a.cols() : a.rows()) == M && (trans_b ? b.cols() : b.rows()) == K &&
                   (trans_b ? b.rows() : b.cols()) == N,
               "c " + c.ShapeString() + " = op(a " + a.ShapeString() + (trans_a ? "^T" : "") + ") op(b " +
                   b.ShapeString() + (trans_b ? "^T" : "") + ")"))
    return;
  if (M == 0 || N == 0) return;
  if (K == 0) {  // c = beta c, and beta == 0 must not keep NaNs from the old c
    if (beta == 0.0) {
      Zero(c);
    } else {
      Scale(c, beta);
    }
    return;
  }
  if (!CublasDimsOk(*this, kOp, {M, N, K})) return;
  const float al = static_cast<float>(alpha), bt = static_cast<float>(beta);
  const cublasComputeType_t compute =
      precision_ == MatmulPrecision::kBf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
  // Column-major: c^T [N, M] = op(b)^T [N, K] op(a)^T [K, M].
  CublasOk(*this, kOp,
           cublasGemmEx(cublas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                        static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &al, b.raw(), CUDA_R_32F,
                        static_cast<int>(b.cols()), a.raw(), CUDA_R_32F, static_cast<int>(a.cols()), &bt, c.raw(),
                        CUDA_R_32F, static_cast<int>(N), compute, CUBLAS_GEMM_DEFAULT),
           "cublasGemmEx");
}

// out_e [n_e, O] = in_e [n_e, I] w_e^T [I, O]; column-major:
// out_e^T [O, n_e] = w_e [O, I] in_e^T [I, n_e]: cuBLAS (T, N), m = O, n = n_e, k = I.
void CudaBackend::GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  static const char* kOp = "GroupedLinearForward";
  if (failed() || !RequireF32(*this, kOp, {&out, &in, &w})) return;
  if (!ShapeOk(*this, kOp, w.ndim() == 3, "w " + w.ShapeString() + " is not [E, O, I]")) return;
  const int64_t E = w.dim(0), O = w.dim(1), I = w.dim(2), R = in.rows();
  if (!ShapeOk(*this, kOp, in.cols() == I && out.cols() == O && out.rows() == R,
               "in " + in.ShapeString() + ", w " + w.ShapeString() + ", out " + out.ShapeString()))
    return;
  if (!CublasDimsOk(*this, kOp, {R, O, I})) return;
  std::vector<int32_t> off;
  if (!ReadOffsets(*this, kOp, offsets, E, R, &off)) return;
  if (O == 0 || off[E] == off[0]) return;
  if (I == 0) {  // an empty dot product: owned rows become 0
    CudaOk(*this, kOp,
           cudaMemsetAsync(out.data<float>() + static_cast<int64_t>(off[0]) * O, 0,
                           static_cast<size_t>(off[E] - off[0]) * O * sizeof(float), stream_),
           "cudaMemsetAsync");
    return;
  }
  const float* x = in.data<float>();  // (R, I)
  const float* wp = w.data<float>();  // (E, O, I)
  float* y = out.data<float>();       // (R, O)
  std::vector<GemmProblem> probs;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    probs.push_back({CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(O), static_cast<int>(rows), static_cast<int>(I),
                     wp + e * O * I, static_cast<int>(I), x + r0 * I, static_cast<int>(I), 0.0f, y + r0 * O,
                     static_cast<int>(O)});
  }
  GroupedGemm(*this, kOp, probs);
}

// Per expert, both in the same grouped call (their outputs never overlap):
//   din_e [n_e, I] += dout_e [n_e, O] w_e [O, I]    cuBLAS (N, N), m = I, n = n_e, k = O
//   dw_e  [O, I]   += dout_e^T [O, n_e] in_e         cuBLAS (N, T), m = I, n = O,   k = n_e
void CudaBackend::GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                                        const Tensor& offsets) {
  static const char* kOp = "GroupedLinearBackward";
  if (failed() || !RequireF32(*this, kOp, {&din, &dw, &dout, &in, &w})) return;
  if (!ShapeOk(*this, kOp, w.ndim() == 3, "w " + w.ShapeString() + " is not [E, O, I]")) return;
  const int64_t E = w.dim(0), O = w.dim(1), I = w.dim(2), R = in.rows();
  if (!ShapeOk(*this, kOp,
               in.cols() == I && din.numel() == in.numel() && dw.numel() == w.numel() && dout.cols() == O &&
                   dout.rows() == R,
               "din " + din.ShapeString() + ", dw " + dw.ShapeString() + ", dout " + dout.ShapeString() + ", in " +
                   in.ShapeString() + ", w " + w.ShapeString()))
    return;
  if (!CublasDimsOk(*this, kOp, {R, O, I})) return;
  std::vector<int32_t> off;
  if (!ReadOffsets(*this, kOp, offsets, E, R, &off)) return;
  if (O == 0 || I == 0) return;          // nothing to add
  const float* x = in.data<float>();     // (R, I)
  const float* wp = w.data<float>();     // (E, O, I)
  const float* dy = dout.data<float>();  // (R, O)
  float* dx = din.data<float>();         // (R, I)
  float* dwp = dw.data<float>();         // (E, O, I)
  // Two grouped calls, one per transpose pattern: a single call mixing them
  // ran several times slower on H100 (cuBLAS picks one kernel per call).
  std::vector<GemmProblem> input_grads, weight_grads;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    input_grads.push_back({CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(I), static_cast<int>(rows),
                           static_cast<int>(O), wp + e * O * I, static_cast<int>(I), dy + r0 * O, static_cast<int>(O),
                           1.0f, dx + r0 * I, static_cast<int>(I)});
    weight_grads.push_back({CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(I), static_cast<int>(O),
                            static_cast<int>(rows), x + r0 * I, static_cast<int>(I), dy + r0 * O, static_cast<int>(O),
                            1.0f, dwp + e * O * I, static_cast<int>(I)});
  }
  GroupedGemm(*this, kOp, input_grads);
  GroupedGemm(*this, kOp, weight_grads);
}

// ---- elementwise --------------------------------------------------------------

void CudaBackend::Add(Tensor& out, const Tensor& a, const Tensor& b) {
  static const char* kOp = "Add";
  if (failed() || !RequireF32(*this, kOp, {&out, &a, &b})) return;
  if (!ShapeOk(*this, kOp, out.numel() == a.numel() && out.numel() == b.numel(),
               out.ShapeString() + " = " + a.ShapeString() + " + " + b.ShapeString()))
    return;
  LaunchForEach(*this, kOp, out.numel(), AddOp{out.data<float>(), a.data<float>(), b.data<float>()});
}

void CudaBackend::Axpy(Tensor& y, double alpha, const Tensor& x) {
  static const char* kOp = "Axpy";
  if (failed() || !RequireF32(*this, kOp, {&y, &x})) return;
  if (!ShapeOk(*this, kOp, y.numel() == x.numel(), y.ShapeString() + " += a * " + x.ShapeString())) return;
  LaunchForEach(*this, kOp, y.numel(), AxpyOp{y.data<float>(), x.data<float>(), static_cast<float>(alpha)});
}

void CudaBackend::Scale(Tensor& x, double alpha) {
  static const char* kOp = "Scale";
  if (failed() || !RequireF32(*this, kOp, {&x})) return;
  LaunchForEach(*this, kOp, x.numel(), ScaleOp{x.data<float>(), static_cast<float>(alpha)});
}

void CudaBackend::ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) {
  static const char* kOp = "ConcatCols";
  if (failed() || !RequireF32(*this, kOp, {&out, &a, &b})) return;
  const int64_t N = out.rows(), A = a.cols(), B = b.cols();
  if (!ShapeOk(*this, kOp, a.rows() == N && b.rows() == N && out.cols() == A + B,
               out.ShapeString() + " = [" + a.ShapeString() + " | " + b.ShapeString() + "]"))
    return;
  if (N == 0 || A + B == 0) return;
  ConcatColsKernel<<<RowColGrid(N, A + B), kThreads, 0, stream_>>>(out.data<float>(), a.data<float>(), b.data<float>(),
                                                                   N, A, B);
  LaunchOk(*this, kOp);
}

void CudaBackend::ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) {
  static const char* kOp = "ConcatColsBackward";
  if (failed() || !RequireF32(*this, kOp, {&da, &db, &dout})) return;
  const int64_t N = dout.rows(), A = da.cols(), B = db.cols();
  if (!ShapeOk(*this, kOp, da.rows() == N && db.rows() == N && dout.cols() == A + B,
               "dout " + dout.ShapeString() + " -> [" + da.ShapeString() + " | " + db.ShapeString() + "]"))
    return;
  if (N == 0 || A + B == 0) return;
  ConcatColsBackwardKernel<<<RowColGrid(N, A + B), kThreads, 0, stream_>>>(da.data<float>(), db.data<float>(),
                                                                           dout.data<float>(), N, A, B);
  LaunchOk(*this, kOp);
}

// ---- reductions and the optimizer ---------------------------------------------

double CudaBackend::Sum(const Tensor& x) { return DeterministicSum<false>(*this, "Sum", x); }

double CudaBackend::SumSquares(const Tensor& x) { return DeterministicSum<true>(*this, "SumSquares", x); }

void CudaBackend::AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) {
  static const char* kOp = "AdamWStep";
  if (failed() || !RequireF32(*this, kOp, {&param, &grad, &m, &v})) return;
  const int64_t n = param.numel();
  if (!ShapeOk(*this, kOp, grad.numel() == n && m.numel() == n && v.numel() == n,
               "param " + param.ShapeString() + ", grad " + grad.ShapeString() + ", m " + m.ShapeString() + ", v " +
                   v.ShapeString()))
    return;
  if (p.step < 1) {
    Fail(kOp, "step must be >= 1 (bias correction), got " + std::to_string(p.step));
    return;
  }
  const double bc1 = 1.0 - std::pow(p.beta1, static_cast<double>(p.step));
  const double bc2 = 1.0 - std::pow(p.beta2, static_cast<double>(p.step));
  LaunchForEach(*this, kOp, n,
                AdamWOp{param.data<float>(), grad.data<float>(), m.data<float>(), v.data<float>(), p.lr, p.beta1,
                        p.beta2, p.eps, p.weight_decay, p.grad_scale, bc1, bc2});
}

}  // namespace troupe
