// CpuBackend: construction, memory and copies. Kernels live beside this file.
#include "gpu/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace troupe {
namespace {

class CpuBuffer final : public Buffer {
 public:
  CpuBuffer(void* p, size_t bytes, CpuBackend* owner) : Buffer(p, bytes, DeviceKind::kCpu), owner_(owner) {}
  ~CpuBuffer() override {
    std::free(ptr());
    owner_->OnFree(bytes());
  }

 private:
  CpuBackend* owner_;
};

std::string HumanBytes(size_t b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

CpuBackend::CpuBackend(int threads) : threads_(threads > 0 ? threads : omp_get_max_threads()) {
  omp_set_num_threads(threads_);
}

bool CpuBackend::SetCallerShare(int ways) {
  const int w = std::max(1, ways);
  omp_set_num_threads((threads_ + w - 1) / w);  // rounded up: never below one
  return true;
}

std::string CpuBackend::Describe() const { return "cpu (" + std::to_string(threads_) + " threads)"; }

Expected<Tensor> CpuBackend::Alloc(std::vector<int64_t> shape, DType dtype, std::string name) {
  int64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0) return Status::InvalidArgument("tensor " + name + ": negative dimension");
    n *= s;
  }
  const size_t bytes = static_cast<size_t>(n) * DTypeSize(dtype);
  // 64-byte alignment for vector loads; at least one line so empty tensors have a pointer.
  const size_t padded = ((bytes + 63) / 64) * 64 + 64;
  void* p = std::aligned_alloc(64, padded);
  if (p == nullptr) {
    return Status::OutOfMemory("out of host memory allocating tensor " + name + " (" + HumanBytes(bytes) +
                               ", " + std::to_string(in_use_.load()) + " bytes already in use)");
  }
  std::memset(p, 0, padded);
  const size_t now = (in_use_ += padded);
  size_t peak = peak_.load();
  while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
  }
  auto buf = std::make_shared<CpuBuffer>(p, padded, this);
  return Tensor(std::move(buf), 0, std::move(shape), dtype, std::move(name));
}

void CpuBackend::Zero(Tensor& t) { std::memset(t.raw(), 0, t.bytes()); }
void CpuBackend::CopyFromHost(Tensor& dst, const void* src) { std::memcpy(dst.raw(), src, dst.bytes()); }
void CpuBackend::CopyToHost(void* dst, const Tensor& src) { std::memcpy(dst, src.raw(), src.bytes()); }
void CpuBackend::Copy(Tensor& dst, const Tensor& src) { std::memmove(dst.raw(), src.raw(), src.bytes()); }

int CpuBackend::RecordTimer() {
  timers_.push_back(std::chrono::steady_clock::now());
  return static_cast<int>(timers_.size()) - 1;
}

double CpuBackend::TimerMs(int start, int end) {
  return std::chrono::duration<double, std::milli>(timers_.at(end) - timers_.at(start)).count();
}

void CpuBackend::ResetTimers() { timers_.clear(); }

}  // namespace troupe
