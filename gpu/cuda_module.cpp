// Loads libtroupe_cuda.so on demand (see gpu/cuda/cuda_info.h).
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "gpu/cuda/cuda_info.h"
#include "gpu/device_comm.h"

#ifndef TROUPE_CUDA_MODULE_DIR
#define TROUPE_CUDA_MODULE_DIR ""
#endif

namespace troupe {
namespace {

constexpr const char* kModuleName = "libtroupe_cuda.so";

struct Module {
  void* handle = nullptr;
  std::string error;  // why it could not be loaded
  int (*device_count)() = nullptr;
  void (*device_summary)(char*, size_t) = nullptr;
  Backend* (*create)(int, int, char*, size_t) = nullptr;
  int (*nccl_unique_id)(uint8_t*, size_t, char*, size_t) = nullptr;
  DeviceComm* (*nccl_create_comm)(Backend*, const uint8_t*, size_t, int, int, const char*, int, char*,
                                  size_t) = nullptr;
};

std::string ExecutableDir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

const Module& LoadModule() {
  static Module m;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* dir = std::getenv("TROUPE_CUDA_MODULE")) candidates.push_back(std::string(dir) + "/" + kModuleName);
    const std::string exe_dir = ExecutableDir();
    if (!exe_dir.empty()) {
      candidates.push_back(exe_dir + "/" + kModuleName);
      candidates.push_back(exe_dir + "/../gpu/" + kModuleName);
      candidates.push_back(exe_dir + "/../lib/" + kModuleName);
    }
    if (*TROUPE_CUDA_MODULE_DIR) candidates.push_back(std::string(TROUPE_CUDA_MODULE_DIR) + "/" + kModuleName);
    candidates.push_back(kModuleName);  // LD_LIBRARY_PATH and the system paths
    for (const std::string& path : candidates) {
      if (path != kModuleName && !std::filesystem::exists(path)) continue;
      m.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (m.handle != nullptr) break;
      m.error = dlerror();
    }
    if (m.handle == nullptr) {
      if (m.error.empty()) m.error = std::string(kModuleName) + " not found (this build has no CUDA backend?)";
      return;
    }
    m.device_count = reinterpret_cast<int (*)()>(dlsym(m.handle, "troupe_cuda_device_count"));
    m.device_summary = reinterpret_cast<void (*)(char*, size_t)>(dlsym(m.handle, "troupe_cuda_device_summary"));
    m.create = reinterpret_cast<Backend* (*)(int, int, char*, size_t)>(dlsym(m.handle, "troupe_create_cuda_backend"));
    m.nccl_unique_id =
        reinterpret_cast<int (*)(uint8_t*, size_t, char*, size_t)>(dlsym(m.handle, "troupe_nccl_unique_id"));
    m.nccl_create_comm =
        reinterpret_cast<DeviceComm* (*)(Backend*, const uint8_t*, size_t, int, int, const char*, int, char*, size_t)>(
            dlsym(m.handle, "troupe_nccl_create_comm"));
    if (!m.device_count || !m.device_summary || !m.create || !m.nccl_unique_id || !m.nccl_create_comm) {
      m.error = std::string(kModuleName) + " lacks the troupe_cuda_* entry points";
      m.handle = nullptr;
    }
  });
  return m;
}

}  // namespace

int CudaDeviceCount() {
  const Module& m = LoadModule();
  return m.handle ? m.device_count() : 0;
}

std::string CudaDeviceSummary() {
  const Module& m = LoadModule();
  if (!m.handle) return "no CUDA backend: " + m.error;
  char buf[512] = {0};
  m.device_summary(buf, sizeof buf);
  return buf;
}

Expected<std::unique_ptr<Backend>> CreateCudaBackend(int device, bool bf16) {
  const Module& m = LoadModule();
  if (!m.handle) return Status::Unimplemented("no CUDA backend: " + m.error);
  char err[512] = {0};
  Backend* be = m.create(device, bf16 ? 1 : 0, err, sizeof err);
  if (be == nullptr) return Status::InvalidArgument(err);
  return std::unique_ptr<Backend>(be);
}

namespace {

// The module, or why device communication cannot run on `be`.
Expected<const Module*> NcclModule(const Backend& be) {
  if (be.device() != DeviceKind::kCuda)
    return Status::Unimplemented("NCCL needs the CUDA backend (--device cuda), not " + be.Describe());
  const Module& m = LoadModule();
  if (!m.handle) return Status::Unimplemented("no CUDA backend: " + m.error);
  return &m;
}

}  // namespace

Expected<std::vector<uint8_t>> NewDeviceCommId(Backend& be) {
  TROUPE_ASSIGN_OR_RETURN(const Module* m, NcclModule(be));
  std::vector<uint8_t> id(256);
  char err[512] = {0};
  const int n = m->nccl_unique_id(id.data(), id.size(), err, sizeof err);
  if (n < 0) return Status::IOError(err);
  id.resize(static_cast<size_t>(n));
  return id;
}

Expected<std::unique_ptr<DeviceComm>> CreateDeviceComm(Backend& be, const DeviceCommSpec& spec, int timeout_ms) {
  TROUPE_ASSIGN_OR_RETURN(const Module* m, NcclModule(be));
  char err[1024] = {0};
  DeviceComm* comm = m->nccl_create_comm(&be, spec.id.data(), spec.id.size(), spec.size, spec.rank, spec.name.c_str(),
                                         timeout_ms, err, sizeof err);
  if (comm == nullptr) return Status::IOError(err);
  return std::unique_ptr<DeviceComm>(comm);
}

}  // namespace troupe
