// CudaBackend: creation, memory, copies and error handling. Kernels live in
// the other gpu/cuda/*.cu files, one concern each.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <mutex>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_timeline.h"

namespace troupe {
namespace {

class CudaBuffer final : public Buffer {
 public:
  CudaBuffer(void* p, size_t bytes, CudaBackend* owner) : Buffer(p, bytes, DeviceKind::kCuda), owner_(owner) {}
  ~CudaBuffer() override { owner_->Release(ptr(), bytes()); }

 private:
  CudaBackend* owner_;
};

std::string Mib(size_t b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1024.0 * 1024.0));
  return buf;
}

std::mutex g_error_mutex;

// The lane each thread asked for, on which backend (a thread may use several).
thread_local const CudaBackend* t_lane_owner = nullptr;
thread_local int t_lane = 0;

}  // namespace

Expected<std::unique_ptr<CudaBackend>> CudaBackend::Create(int device, MatmulPrecision precision) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status::InvalidArgument(std::string("no CUDA device: ") +
                                   (err != cudaSuccess ? cudaGetErrorString(err) : "none found"));
  }
  if (device < 0 || device >= count) {
    return Status::InvalidArgument("CUDA device " + std::to_string(device) + " does not exist (" +
                                   std::to_string(count) + " present)");
  }
  std::unique_ptr<CudaBackend> be(new CudaBackend(device, precision));
  cudaSetDevice(device);
  for (Lane& l : be->lanes_) {
    if ((err = cudaStreamCreateWithFlags(&l.stream, cudaStreamNonBlocking)) != cudaSuccess)
      return Status::Internal(std::string("cudaStreamCreate: ") + cudaGetErrorString(err));
    cudaEvent_t passed = nullptr;
    if ((err = cudaEventCreateWithFlags(&passed, cudaEventDisableTiming)) != cudaSuccess)
      return Status::Internal(std::string("cudaEventCreate: ") + cudaGetErrorString(err));
    l.passed = passed;
    if (cublasCreate(&l.cublas) != CUBLAS_STATUS_SUCCESS) return Status::Internal("cublasCreate failed");
    cublasSetStream(l.cublas, l.stream);
  }
  if (cublasLtCreate(&be->cublaslt_) != CUBLAS_STATUS_SUCCESS) return Status::Internal("cublasLtCreate failed");
  // Tensors come from the device's stream-ordered pool (cudaMallocAsync):
  // cudaFree waits for the whole device, NCCL kernels included, and a
  // pipeline send queued for a receiver that comes later would make that a
  // wait on the peer from inside a free, with no deadline. Freed blocks stay
  // in the pool for reuse instead of going back to the driver at each sync.
  cudaMemPool_t pool = nullptr;
  if ((err = cudaDeviceGetDefaultMemPool(&pool, device)) != cudaSuccess)
    return Status::Internal(std::string("cudaDeviceGetDefaultMemPool: ") + cudaGetErrorString(err));
  uint64_t keep = UINT64_MAX;
  cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, device);
  be->name_ = prop.name;
  return Expected<std::unique_ptr<CudaBackend>>(std::move(be));
}

CudaBackend::~CudaBackend() {
  for (Lane& l : lanes_) {
    if (l.workspace) cudaFreeAsync(l.workspace, l.stream);
    if (l.stream) cudaStreamSynchronize(l.stream);
  }
  for (void* e : timer_events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  if (cublaslt_) cublasLtDestroy(cublaslt_);
  unfenced_.reset();
  if (copy_stream_) {
    cudaStreamSynchronize(copy_stream_);
    cudaStreamDestroy(copy_stream_);
  }
  for (Lane& l : lanes_) {
    if (l.cublas) cublasDestroy(l.cublas);
    if (l.passed) cudaEventDestroy(static_cast<cudaEvent_t>(l.passed));
    if (l.stream) cudaStreamDestroy(l.stream);
  }
}

CudaBackend::Lane& CudaBackend::lane() const { return lanes_[t_lane_owner == this ? t_lane : 0]; }

bool CudaBackend::SetCallerLane(int lane) {
  if (lane < 0 || lane >= kLanes) return false;
  // A new thread's current device is 0: launches into this backend's
  // streams from another device's context would fail.
  if (const cudaError_t err = cudaSetDevice(device_); err != cudaSuccess) {
    Fail("SetCallerLane", cudaGetErrorString(err));
    return false;
  }
  t_lane_owner = this;
  t_lane = lane;
  return true;
}

void CudaBackend::OrderLanes() {
  if (failed()) return;
  // Each lane passes a mark, then every lane waits for every other's: a fork
  // (lane 1 sees what lane 0 computed so far) and a join in one.
  cudaError_t err = cudaSuccess;
  for (Lane& l : lanes_)
    if (err == cudaSuccess) err = cudaEventRecord(static_cast<cudaEvent_t>(l.passed), l.stream);
  for (Lane& waits : lanes_)
    for (Lane& other : lanes_)
      if (err == cudaSuccess && &waits != &other)
        err = cudaStreamWaitEvent(waits.stream, static_cast<cudaEvent_t>(other.passed), 0);
  if (err != cudaSuccess) Fail("OrderLanes", cudaGetErrorString(err));
}

std::string CudaBackend::Describe() const {
  return "cuda:" + std::to_string(device_) + " (" + name_ + ", " +
         (precision_ == MatmulPrecision::kBf16 ? "bf16" : "fp32") + " matmul)";
}

void CudaBackend::Fail(const std::string& what, const std::string& why) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (!failed_.exchange(true)) first_error_ = "CUDA " + what + ": " + why;
}

Status CudaBackend::Synchronize() {
  cudaError_t err = cudaStreamSynchronize(stream());
  if (err != cudaSuccess) Fail("stream", cudaGetErrorString(err));
  if (!failed_.load()) return Status::Ok();
  std::lock_guard<std::mutex> lock(g_error_mutex);  // the other lane may be failing right now
  return Status::Internal(first_error_);
}

void* CudaBackend::Workspace(size_t bytes, const char* op, const char* purpose) {
  Lane& l = lane();
  if (bytes <= l.workspace_bytes) return l.workspace;
  // In stream order: the kernels queued so far still use the old one.
  if (l.workspace) cudaFreeAsync(l.workspace, l.stream);
  l.workspace = nullptr;
  l.workspace_bytes = 0;
  if (cudaMallocAsync(&l.workspace, bytes, l.stream) != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    Fail(op, "out of GPU memory allocating " + Mib(bytes) + " of " + purpose + "; Troupe holds " + Mib(in_use_.load()) +
                 " in tensors, the device has " + Mib(free_b) + " free of " + Mib(total_b));
    return nullptr;
  }
  l.workspace_bytes = bytes;
  return l.workspace;
}

Expected<Tensor> CudaBackend::Alloc(std::vector<int64_t> shape, DType dtype, std::string name) {
  int64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0) return Status::InvalidArgument("tensor " + name + ": negative dimension");
    n *= s;
  }
  const size_t bytes = static_cast<size_t>(n) * DTypeSize(dtype);
  const size_t padded = ((bytes + 255) / 256) * 256 + 256;
  void* p = nullptr;
  cudaError_t err = cudaMallocAsync(&p, padded, stream());
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return Status::OutOfMemory("out of GPU memory allocating tensor " + name + " " + std::to_string(n) + " x " +
                               DTypeName(dtype) + " (" + Mib(bytes) + "); Troupe holds " + Mib(in_use_.load()) +
                               ", the device has " + Mib(free_b) + " free of " + Mib(total_b));
  }
  cudaMemsetAsync(p, 0, padded, stream());
  const size_t now = (in_use_ += padded);
  size_t peak = peak_.load();
  while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
  }
  auto buf = std::make_shared<CudaBuffer>(p, padded, this);
  return Tensor(std::move(buf), 0, std::move(shape), dtype, std::move(name));
}

void CudaBackend::Zero(Tensor& t) {
  if (!failed()) cudaMemsetAsync(t.raw(), 0, t.bytes(), stream());
}

void CudaBackend::CopyFromHost(Tensor& dst, const void* src) {
  cudaError_t err = cudaMemcpyAsync(dst.raw(), src, dst.bytes(), cudaMemcpyHostToDevice, stream());
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream());  // `src` may die after we return
  if (err != cudaSuccess) Fail("CopyFromHost", cudaGetErrorString(err));
}

void CudaBackend::CopyToHost(void* dst, const Tensor& src) {
  cudaError_t err = cudaMemcpyAsync(dst, src.raw(), src.bytes(), cudaMemcpyDeviceToHost, stream());
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream());
  if (err != cudaSuccess) Fail("CopyToHost", cudaGetErrorString(err));
}

namespace {

// One batch of background copies: done when `done` (recorded on the copy
// stream after the last copy) has fired.
class CudaHostCopies final : public Backend::HostCopies {
 public:
  explicit CudaHostCopies(cudaEvent_t done) : done_(done) {}
  ~CudaHostCopies() override { cudaEventDestroy(done_); }
  Status Wait() override {
    const cudaError_t err = cudaEventSynchronize(done_);
    if (err != cudaSuccess)
      return Status::Internal(std::string("background device->host copy: ") + cudaGetErrorString(err));
    return Status::Ok();
  }
  cudaEvent_t event() const { return done_; }

 private:
  cudaEvent_t done_;
};

}  // namespace

std::shared_ptr<uint8_t> CudaBackend::AllocStagingHost(size_t bytes) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocDefault) != cudaSuccess) {
    cudaGetLastError();  // not sticky: the caller falls back to pageable memory
    return nullptr;
  }
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { cudaFreeHost(q); });
}

Expected<std::shared_ptr<Backend::HostCopies>> CudaBackend::CopyToHostAsync(
    const std::vector<std::pair<uint8_t*, const Tensor*>>& copies) {
  if (failed()) return Synchronize();
  auto check = [](cudaError_t err, const char* what) -> Status {
    if (err == cudaSuccess) return Status::Ok();
    return Status::Internal(std::string("background device->host copy: ") + what + ": " + cudaGetErrorString(err));
  };
  if (copy_stream_ == nullptr)
    TROUPE_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "stream"));
  cudaEvent_t queued = nullptr, done = nullptr;
  TROUPE_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&queued, cudaEventDisableTiming), "event"));
  Status s = check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "event");
  if (s.ok()) s = check(cudaEventRecord(queued, stream()), "record");
  if (s.ok()) s = check(cudaStreamWaitEvent(copy_stream_, queued, 0), "wait");
  for (size_t i = 0; s.ok() && i < copies.size(); ++i)
    s = check(cudaMemcpyAsync(copies[i].first, copies[i].second->raw(), copies[i].second->bytes(),
                              cudaMemcpyDeviceToHost, copy_stream_),
              "copy");
  if (s.ok()) s = check(cudaEventRecord(done, copy_stream_), "record");
  cudaEventDestroy(queued);  // released once the copy stream has passed it
  if (!s.ok()) {
    if (done) cudaEventDestroy(done);
    return s;
  }
  auto batch = std::make_shared<CudaHostCopies>(done);
  unfenced_ = batch;
  return std::shared_ptr<HostCopies>(batch);
}

void CudaBackend::Release(void* p, size_t bytes) {
  in_use_ -= bytes;
  // After the kernels queued so far; background copies may still read the
  // block too, and then it is freed on their stream once both have passed.
  auto* copies = static_cast<CudaHostCopies*>(unfenced_.get());
  if (copies != nullptr && cudaEventQuery(copies->event()) == cudaErrorNotReady) {
    cudaEvent_t queued = nullptr;
    if (cudaEventCreateWithFlags(&queued, cudaEventDisableTiming) == cudaSuccess &&
        cudaEventRecord(queued, stream()) == cudaSuccess &&
        cudaStreamWaitEvent(copy_stream_, queued, 0) == cudaSuccess) {
      cudaEventDestroy(queued);
      cudaFreeAsync(p, copy_stream_);
      return;
    }
    if (queued) cudaEventDestroy(queued);
    cudaStreamWaitEvent(stream(), copies->event(), 0);  // could not order it on the copy stream: wait for the copies
  }
  cudaFreeAsync(p, stream());
}

void CudaBackend::FenceHostCopies() {
  if (!unfenced_ || failed()) return;
  const cudaError_t err = cudaStreamWaitEvent(stream(), static_cast<CudaHostCopies*>(unfenced_.get())->event(), 0);
  if (err != cudaSuccess) Fail("FenceHostCopies", cudaGetErrorString(err));
  unfenced_.reset();
}

void CudaBackend::Copy(Tensor& dst, const Tensor& src) {
  if (failed()) return;
  cudaError_t err = cudaMemcpyAsync(dst.raw(), src.raw(), src.bytes(), cudaMemcpyDeviceToDevice, stream());
  if (err != cudaSuccess) Fail("Copy", cudaGetErrorString(err));
}

int CudaBackend::RecordTimer() {
  if (timers_used_ == static_cast<int>(timer_events_.size())) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) {
      Fail("RecordTimer", "cudaEventCreate failed");
      return -1;
    }
    timer_events_.push_back(e);
  }
  cudaEventRecord(static_cast<cudaEvent_t>(timer_events_[timers_used_]), stream());
  return timers_used_++;
}

double CudaBackend::TimerMs(int start, int end) {
  if (start < 0 || end < 0 || end >= timers_used_) return 0.0;
  auto b = static_cast<cudaEvent_t>(timer_events_[end]);
  cudaEventSynchronize(b);
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(timer_events_[start]), b);
  return ms;
}

void CudaBackend::ResetTimers() { timers_used_ = 0; }

Status CudaBackend::StartKernelTimeline() { return cuda_timeline::Start(); }

Expected<std::vector<KernelSpan>> CudaBackend::TakeKernelSpans() { return cuda_timeline::Take(device_); }

}  // namespace troupe
