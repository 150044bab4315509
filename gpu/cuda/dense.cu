// CUDA dense algebra: cuBLAS GEMMs, elementwise arithmetic, column
// concatenation, deterministic reductions and AdamW. The grouped GEMMs of the
// routed experts live in grouped_gemm.cu.
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
//          bf16 on the tensor cores, fp32 accumulation and output).
//
// Determinism: cuBLAS GEMMs are deterministic for fixed shapes, pointers'
// alignment and handle settings (no atomics-based split-K by default). Sum
// and SumSquares reduce fixed chunks into double partials, then one block adds
// the partials in a fixed tree: the result never depends on scheduling.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_util.cuh"

namespace troupe {
namespace {

using namespace cuda_util;  // the shared launch / check helpers

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
           cublasGemmEx(cublas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                        static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &al, b.raw(), CUDA_R_32F,
                        static_cast<int>(b.cols()), a.raw(), CUDA_R_32F, static_cast<int>(a.cols()), &bt, c.raw(),
                        CUDA_R_32F, static_cast<int>(N), compute, CUBLAS_GEMM_DEFAULT),
           "cublasGemmEx");
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
  ConcatColsKernel<<<RowColGrid(N, A + B), kThreads, 0, stream()>>>(out.data<float>(), a.data<float>(), b.data<float>(),
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
  ConcatColsBackwardKernel<<<RowColGrid(N, A + B), kThreads, 0, stream()>>>(da.data<float>(), db.data<float>(),
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
