// Internal helpers shared by the CUDA backend's kernel files (gpu/cuda/*.cu):
// launch geometry, error recording into the backend's sticky error, operand
// checks, and the generic grid-stride launchers. Not part of any public API;
// include it only from .cu files. Everything is `inline` (or a template), so
// each translation unit can include it.
//
// Error helpers all follow one convention: true when fine, else they call
// be.Fail(op, why) and return false, so callers write
//   if (failed() || !RequireF32(*this, kOp, {&a, &b})) return;
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "gpu/cuda/cuda_backend.h"

namespace troupe::cuda_util {

inline constexpr int kThreads = 256;         // threads per block of the grid-stride kernels
inline constexpr int64_t kMaxBlocks = 8192;  // grid-stride kernels never launch more blocks

// ---- launch geometry ---------------------------------------------------------------

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `per_block` work items needed to cover `work` (no upper bound).
inline unsigned Blocks(int64_t work, int64_t per_block) { return static_cast<unsigned>(CeilDiv(work, per_block)); }

// Grid of a 1-D grid-stride kernel over n elements (kThreads per block).
inline unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(CeilDiv(n, kThreads), kMaxBlocks)));
}

// Grid of a (row, column) grid-stride kernel: x over columns, y over rows.
inline dim3 RowColGrid(int64_t rows, int64_t cols) {
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(CeilDiv(cols, kThreads), 64));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>(rows, 65535));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

// True when v fits a (non-negative) int, as the 32-bit cuBLAS interface needs.
inline bool FitsInt(int64_t v) { return v >= 0 && v <= INT_MAX; }

// ---- error recording ---------------------------------------------------------------

// Records a launch failure of the kernel just queued (a bad configuration or
// an earlier asynchronous fault); `what` names it in the message.
inline bool LaunchOk(CudaBackend& be, const char* op, const char* what = "kernel launch") {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return true;
  be.Fail(op, std::string(what) + ": " + cudaGetErrorString(err));
  return false;
}

inline bool CudaOk(CudaBackend& be, const char* op, cudaError_t err, const char* call) {
  if (err == cudaSuccess) return true;
  be.Fail(op, std::string(call) + ": " + cudaGetErrorString(err));
  return false;
}

inline bool CublasOk(CudaBackend& be, const char* op, cublasStatus_t st, const char* call) {
  if (st == CUBLAS_STATUS_SUCCESS) return true;
  be.Fail(op, std::string(call) + ": " + cublasGetStatusString(st));
  return false;
}

// Fails unless every dimension fits the 32-bit cuBLAS interface.
inline bool CublasDimsOk(CudaBackend& be, const char* op, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) {
    if (!FitsInt(d)) {
      be.Fail(op, "dimensions exceed the 32-bit cuBLAS interface");
      return false;
    }
  }
  return true;
}

// ---- operand checks ----------------------------------------------------------------

// Fails with `why` unless ok.
inline bool Check(CudaBackend& be, const char* op, bool ok, const std::string& why) {
  if (!ok) be.Fail(op, why);
  return ok;
}

inline bool ShapeOk(CudaBackend& be, const char* op, bool ok, const std::string& what) {
  return Check(be, op, ok, "shape mismatch: " + what);
}

// True when every tensor is a defined CUDA tensor of `dtype`; else records why.
inline bool Require(CudaBackend& be, const char* op, DType dtype, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (!t->defined()) {
      be.Fail(op, "undefined tensor");
      return false;
    }
    if (t->device() != DeviceKind::kCuda) {
      be.Fail(op, "tensor " + t->name() + " is not on the CUDA device");
      return false;
    }
    if (t->dtype() != dtype) {
      be.Fail(op, "tensor " + t->name() + " is " + DTypeName(t->dtype()) + ", expected " + DTypeName(dtype) +
                      " (the CUDA backend computes in F32 only)");
      return false;
    }
  }
  return true;
}

inline bool RequireF32(CudaBackend& be, const char* op, std::initializer_list<const Tensor*> ts) {
  return Require(be, op, DType::kF32, ts);
}

// ---- device helpers ----------------------------------------------------------------

// Sum over the 32 lanes of a warp (xor butterfly): every lane ends with the
// same, bitwise identical value. All lanes must take part.
__device__ __forceinline__ double WarpSumDouble(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- grid-stride launchers (functors, not device lambdas: those would need
// nvcc's --extended-lambda) ------------------------------------------------------------

// f(i) for every i < n.
template <typename F>
__global__ void ForEachKernel(int64_t n, F f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// f(n, j) for every row n < rows, column j < cols.
template <typename F>
__global__ void RowColKernel(int64_t rows, int64_t cols, F f) {
  for (int64_t n = blockIdx.y; n < rows; n += gridDim.y)
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      f(n, j);
}

template <typename F>
void LaunchForEach(CudaBackend& be, const char* op, int64_t n, const F& f) {
  if (n <= 0) return;
  ForEachKernel<<<GridFor(n), kThreads, 0, be.stream()>>>(n, f);
  LaunchOk(be, op);
}

template <typename F>
void LaunchRowCol(CudaBackend& be, const char* op, int64_t rows, int64_t cols, const F& f) {
  if (rows <= 0 || cols <= 0) return;
  RowColKernel<<<RowColGrid(rows, cols), kThreads, 0, be.stream()>>>(rows, cols, f);
  LaunchOk(be, op);
}

}  // namespace troupe::cuda_util
