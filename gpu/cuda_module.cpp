// Loads libtroupe_cuda.so on demand (see gpu/cuda/cuda_info.h).
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "gpu/cuda/cuda_info.h"

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
    if (!m.device_count || !m.device_summary || !m.create) {
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

}  // namespace troupe
