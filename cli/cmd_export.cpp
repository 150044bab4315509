// troupe export: write a model's weights as safetensors in the DeepSeek-V3
// layout (docs/weights.md): the seed's initial weights, or a re-export of
// existing weights (import + export: the same bits come back).
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "gpu/cpu/cpu_backend.h"
#include "storage/model_weights.h"

namespace troupe::cli {
namespace {

struct ExportFlags {
  std::string config, from, out;
};

int RunExport(const ExportFlags& f) {
  auto job = LoadJob(f.config);
  if (!job.ok()) return Fail(job.status());
  CpuBackend be(1);
  auto params = AllocateParams(be, job->model, DType::kF32);
  if (!params.ok()) return Fail(params.status());
  Status st = f.from.empty() ? InitParams(be, job->model, job->train.seed, *params)
                             : ImportWeights(be, job->model, f.from, *params);
  if (!st.ok()) return Fail(st);
  st = ExportWeights(be, job->model, *params, f.out, {{"config", job->toml_text}});
  if (!st.ok()) return Fail(st);
  std::printf("wrote %s (%zu tensors, %.2fM parameters)\n", f.out.c_str(), ExportLayout(job->model, *params).size(),
              CountParams(*params) / 1e6);
  return 0;
}

}  // namespace

void AddExportCommand(CLI::App& app, RunFn& run) {
  auto flags = std::make_shared<ExportFlags>();
  CLI::App* cmd = app.add_subcommand("export", "write weights as safetensors (DeepSeek-V3 tensor names)");
  cmd->add_option("--config", flags->config, "job config (TOML)")->required();
  cmd->add_option("--from", flags->from, "weights to re-export (default: the config seed's initial weights)");
  cmd->add_option("--out", flags->out, "output .safetensors path")->required();
  cmd->callback([flags, &run] { run = [flags] { return RunExport(*flags); }; });
}

}  // namespace troupe::cli
