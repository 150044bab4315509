// troupe train: single-process training, printing loss, validation loss and
// tokens/s; writes the final weights as safetensors.
#include <cstdio>
#include <filesystem>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "gpu/profiling_backend.h"
#include "storage/model_weights.h"
#include "train/trainer.h"

namespace troupe::cli {
namespace {

struct TrainFlags {
  std::string config;
  std::string device;
  std::string precision = "auto";
  std::string weights;  // optional initial weights
  std::string out_dir;
  int threads = -1;
  int steps = -1;
  bool profile = false;
};

int RunTrain(const TrainFlags& f) {
  auto job = LoadJob(f.config);
  if (!job.ok()) return Fail(job.status());
  TrainConfig& tc = job->train;
  if (f.steps > 0) tc.steps = f.steps;
  if (f.threads >= 0) tc.threads = f.threads;
  if (!f.device.empty()) tc.device = f.device;
  auto backend = MakeBackend(tc.device, tc.threads, f.precision);
  if (!backend.ok()) return Fail(backend.status());
  // --profile: every backend op timed on the device clock; the table is
  // printed at the end (steps after the first, which warms up the GPU).
  std::unique_ptr<ProfilingBackend> profiler;
  if (f.profile) profiler = std::make_unique<ProfilingBackend>(**backend);
  Backend& be = profiler ? static_cast<Backend&>(*profiler) : **backend;
  auto trainer_or = Trainer::Create(be, *job);
  if (!trainer_or.ok()) return Fail(trainer_or.status());
  Trainer& trainer = **trainer_or;
  if (!f.weights.empty()) {
    Status st = ImportWeights(be, job->model, f.weights, trainer.model().params());
    if (!st.ok()) return Fail(st);
  }
  // Make (or refuse) the output folder once the inputs check out but before
  // any training, so a bad --out costs nothing rather than the whole run.
  std::string out_dir = f.out_dir;
  if (out_dir.empty()) out_dir = "runs/" + std::filesystem::path(f.config).stem().string();
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Fail(Status::IOError("cannot create output folder " + out_dir + ": " + ec.message()));
  ModelParams& params = trainer.model().params();
  std::printf("troupe train: %s on %s\n", f.config.c_str(), be.Describe().c_str());
  std::printf("model: %.2fM parameters, %.2fM active per token; batch %d x %d tokens; %lld training tokens\n",
              CountParams(params) / 1e6, CountActiveParams(job->model, params) / 1e6, tc.batch_size, tc.seq_len,
              static_cast<long long>(trainer.train_tokens()));
  std::printf("unigram baseline (validation cross-entropy of train-set token frequencies): %.4f\n",
              trainer.unigram_baseline());
  std::fflush(stdout);
  double tokens = 0, seconds = 0, last_val = 0;
  for (int s = 0; s < tc.steps; ++s) {
    auto r = trainer.Step();
    if (!r.ok()) return Fail(r.status());
    if (profiler) {
      profiler->Collect();  // resolve this step's timers (keeps the event pool small)
      if (r->step == 1) profiler->Clear();  // the first step pays for warm-up
    }
    tokens += r->tokens;
    seconds += r->seconds;
    const bool last = r->step == tc.steps;
    if (r->step % tc.log_every == 0 || r->step == 1 || last) {
      std::printf("step %5d/%d | loss %.4f | main %.4f", r->step, tc.steps, r->loss.total, r->loss.main);
      for (double m : r->loss.mtp) std::printf(" | mtp %.4f", m);
      std::printf(" | balance %.2e | lr %.2e | gnorm %.3f | max/mean load %.2f | %.0f tok/s\n", r->loss.balance,
                  r->lr, r->grad_norm, r->max_load_ratio, r->tokens / r->seconds);
    }
    if ((tc.eval_every > 0 && r->step % tc.eval_every == 0) || last) {
      auto val = trainer.Evaluate();
      if (!val.ok()) return Fail(val.status());
      last_val = *val;
      std::printf("step %5d/%d | val_loss %.4f | unigram_baseline %.4f | %.0f tok/s average | memory %.1f MiB "
                  "(peak %.1f)\n",
                  r->step, tc.steps, *val, trainer.unigram_baseline(), tokens / seconds,
                  be.bytes_in_use() / 1048576.0, be.peak_bytes() / 1048576.0);
    }
    std::fflush(stdout);
  }
  std::printf("done: val_loss %.4f vs unigram baseline %.4f (%+.4f nats); %.0f training tokens/s\n", last_val,
              trainer.unigram_baseline(), last_val - trainer.unigram_baseline(), tokens / seconds);
  const std::string path = out_dir + "/model.safetensors";
  Status st = ExportWeights(be, job->model, params, path,
                            {{"config", job->toml_text}, {"step", std::to_string(trainer.step())}});
  if (!st.ok()) return Fail(st);
  if (profiler) std::printf("profile (steps 2..%d, every backend op):\n%s", tc.steps, profiler->Report().c_str());
  std::printf("weights: %s\n", path.c_str());
  return 0;
}

}  // namespace

void AddTrainCommand(CLI::App& app, RunFn& run) {
  auto flags = std::make_shared<TrainFlags>();
  CLI::App* cmd = app.add_subcommand("train", "train a model in this process");
  cmd->add_option("--config", flags->config, "job config (TOML)")->required();
  cmd->add_option("--device", flags->device, "auto, cpu or cuda (default: the config's train.device)");
  cmd->add_flag("--profile", flags->profile, "time every backend op and print a per-op table at the end");
  cmd->add_option("--precision", flags->precision, "GPU matmuls: bf16 (auto on a GPU) or fp32");
  cmd->add_option("--threads", flags->threads, "CPU threads (default: the config's; 0 = all cores)")
      ->check(IntAtLeast(0));
  cmd->add_option("--steps", flags->steps, "optimizer steps (default: the config's)")->check(IntAtLeast(1));
  cmd->add_option("--weights", flags->weights, "start from these safetensors weights instead of the seed's");
  cmd->add_option("--out", flags->out_dir, "where to write model.safetensors (default runs/<config name>)");
  cmd->callback([flags, &run] { run = [flags] { return RunTrain(*flags); }; });
}

}  // namespace troupe::cli
