#include "cli/cli_util.h"

#include "gpu/cpu/cpu_backend.h"
#ifdef TROUPE_HAVE_CUDA
#include "gpu/cuda/cuda_info.h"
#endif

namespace troupe::cli {

int Fail(const Status& status) {
  std::fprintf(stderr, "troupe: error: %s\n", status.message().c_str());
  return status.IsInvalidArgument() || status.IsNotFound() || status.IsCorruption() ? 2 : 1;
}

Expected<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int threads) {
  if (device == "cpu") return std::unique_ptr<Backend>(new CpuBackend(threads));
  if (device == "cuda") {
#ifdef TROUPE_HAVE_CUDA
    if (CudaDeviceCount() == 0) return Status::InvalidArgument("--device cuda: " + CudaDeviceSummary());
#endif
    return Status::Unimplemented("--device cuda: the CUDA backend is not built yet; use --device cpu");
  }
  return Status::InvalidArgument("--device must be cpu or cuda, not '" + device + "'");
}

Expected<JobConfig> LoadJob(const std::string& path) { return LoadConfigFile(path); }

}  // namespace troupe::cli
