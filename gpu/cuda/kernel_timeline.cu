#include <cuda_runtime.h>
#include <cupti.h>
#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "gpu/cuda/kernel_timeline.h"

namespace troupe::cuda_timeline {
namespace {

constexpr size_t kBufferBytes = size_t{8} << 20;

struct Cupti {
  CUptiResult (*register_callbacks)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc) = nullptr;
  CUptiResult (*enable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*flush_all)(uint32_t) = nullptr;
  CUptiResult (*next_record)(uint8_t*, size_t, CUpti_Activity**) = nullptr;
  CUptiResult (*result_string)(CUptiResult, const char**) = nullptr;
};

std::mutex g_mu;
Cupti g_cupti;
Status g_started = Status::Unimplemented("the kernel timeline was not started");
bool g_tried = false;
std::map<uint32_t, std::vector<KernelSpan>> g_spans;  // by device

std::string Explain(CUptiResult r) {
  const char* s = nullptr;
  if (g_cupti.result_string) g_cupti.result_string(r, &s);
  return s ? s : "CUPTI error " + std::to_string(static_cast<int>(r));
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mu);
  CUpti_Activity* record = nullptr;
  while (g_cupti.next_record(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && record->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    if (k->start == 0 || k->end <= k->start) continue;  // incomplete (a forced flush)
    g_spans[k->deviceId].push_back({k->start, k->end, k->name != nullptr && IsCommKernel(k->name)});
  }
  std::free(buffer);
}

template <class Fn>
bool Bind(void* lib, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  return fn != nullptr;
}

}  // namespace

Status Start() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_tried) return g_started;
  g_tried = true;
  void* lib = dlopen("libcupti.so.13", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) lib = dlopen("libcupti.so", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return g_started = Status::Unimplemented(std::string("no kernel timeline: ") + dlerror());
  Cupti c;
  if (!Bind(lib, "cuptiActivityRegisterCallbacks", c.register_callbacks) ||
      !Bind(lib, "cuptiActivityEnable", c.enable) || !Bind(lib, "cuptiActivityFlushAll", c.flush_all) ||
      !Bind(lib, "cuptiActivityGetNextRecord", c.next_record) || !Bind(lib, "cuptiGetResultString", c.result_string))
    return g_started = Status::Unimplemented("no kernel timeline: libcupti lacks the activity API");
  g_cupti = c;
  CUptiResult r = c.register_callbacks(BufferRequested, BufferCompleted);
  if (r == CUPTI_SUCCESS) r = c.enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  if (r != CUPTI_SUCCESS) return g_started = Status::Internal("no kernel timeline: " + Explain(r));
  return g_started = Status::Ok();
}

Expected<std::vector<KernelSpan>> Take(int device) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_started.ok()) return g_started;
  }
  int current = 0;
  cudaGetDevice(&current);
  cudaSetDevice(device);
  const cudaError_t e = cudaDeviceSynchronize();  // every stream of the device: the kernels have ended
  cudaSetDevice(current);
  if (e != cudaSuccess) return Status::Internal(std::string("kernel timeline: CUDA: ") + cudaGetErrorString(e));
  // Delivers the buffers through BufferCompleted, which takes g_mu.
  const CUptiResult r = g_cupti.flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  if (r != CUPTI_SUCCESS) return Status::Internal("kernel timeline: " + Explain(r));
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<KernelSpan> out = std::move(g_spans[static_cast<uint32_t>(device)]);
  g_spans[static_cast<uint32_t>(device)].clear();
  return out;
}

}  // namespace troupe::cuda_timeline
