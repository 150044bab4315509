// The C entry points of libtroupe_cuda.so, found by gpu/cuda_module.cpp with
// dlsym. Plain C signatures, so the loader needs no CUDA header.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "gpu/cuda/cuda_backend.h"

namespace {

void CopyMessage(const std::string& msg, char* out, size_t len) {
  if (out == nullptr || len == 0) return;
  std::snprintf(out, len, "%s", msg.c_str());
}

}  // namespace

extern "C" int troupe_cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

extern "C" void troupe_cuda_device_summary(char* out, size_t len) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    CopyMessage(std::string("no CUDA device: ") + cudaGetErrorString(err), out, len);
    return;
  }
  if (n == 0) return CopyMessage("no CUDA device", out, len);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  char buf[256];
  std::snprintf(buf, sizeof buf, "%d x %s, %.1f GiB, sm_%d%d", n, prop.name,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0), prop.major, prop.minor);
  CopyMessage(buf, out, len);
}

// Returns a heap-allocated Backend (the caller owns it) or null with `error` set.
extern "C" troupe::Backend* troupe_create_cuda_backend(int device, int bf16, char* error, size_t error_len) {
  auto be = troupe::CudaBackend::Create(device, bf16 ? troupe::MatmulPrecision::kBf16 : troupe::MatmulPrecision::kFp32);
  if (!be.ok()) {
    CopyMessage(be.status().message(), error, error_len);
    return nullptr;
  }
  return std::move(be).value().release();
}
