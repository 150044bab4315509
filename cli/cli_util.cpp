#include "cli/cli_util.h"

#include "gpu/cpu/cpu_backend.h"
#include "gpu/cuda/cuda_info.h"

namespace troupe::cli {

int Fail(const Status& status) {
  std::fprintf(stderr, "troupe: error: %s\n", status.message().c_str());
  return status.IsInvalidArgument() || status.IsNotFound() || status.IsCorruption() ? 2 : 1;
}

Expected<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int threads, const std::string& precision,
                                               int gpu) {
  if (precision != "auto" && precision != "fp32" && precision != "bf16") {
    return Status::InvalidArgument("--precision must be auto, fp32 or bf16, not '" + precision + "'");
  }
  if (device == "auto") return MakeBackend(CudaDeviceCount() > 0 ? "cuda" : "cpu", threads, precision, gpu);
  if (device == "cpu") {
    if (precision == "auto") return MakeBackend(device, threads, "fp32", gpu);
    if (precision != "fp32") return Status::InvalidArgument("--precision bf16 needs --device cuda");
    return std::unique_ptr<Backend>(new CpuBackend(threads));
  }
  if (device == "cuda") {
    auto be = CreateCudaBackend(gpu, precision != "fp32");  // auto = bf16 GEMMs on the GPU
    if (!be.ok()) return be.status().WithContext("--device cuda");
    return std::move(be).value();
  }
  return Status::InvalidArgument("--device must be auto, cpu or cuda, not '" + device + "'");
}

Expected<JobConfig> LoadJob(const std::string& path) { return LoadConfigFile(path); }

CLI::Validator IntAtLeast(int min) {
  return CLI::Validator(
      [min](std::string& s) -> std::string {
        int v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return "'" + s + "' is not a whole number (up to 2147483647)";
        if (v < min) return "must be at least " + std::to_string(min) + ", not " + s;
        return {};
      },
      "INT>=" + std::to_string(min));
}

}  // namespace troupe::cli
