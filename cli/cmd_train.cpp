// troupe train: single-process training, printing loss, validation loss and
// tokens/s; writes the final weights as safetensors.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/train_dist.h"
#include "gpu/profiling_backend.h"
#include "storage/model_weights.h"
#include "train/checkpointer.h"
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
  std::string ckpt_dir;  // default <out>/checkpoints
  int ckpt_every = -1;   // default: the config's checkpoint.every
  std::string resume;    // a checkpoint id, or "latest"
  ParallelFlags parallel;
  int timeout_s = 60;
  bool kernel_timeline = false;
};

int RunTrain(const TrainFlags& f) {
  auto job = LoadJob(f.config);
  if (!job.ok()) return Fail(job.status());
  TrainConfig& tc = job->train;
  if (f.steps > 0) tc.steps = f.steps;
  if (f.threads >= 0) tc.threads = f.threads;
  if (!f.device.empty()) tc.device = f.device;
  f.parallel.ApplyTo(job->parallel);
  Status par = ValidateParallelConfig(job->parallel);
  if (!par.ok()) return Fail(par);
  if (job->parallel.dp == 0) job->parallel.dp = 1;  // "as many as fit": one machine's launcher makes one replica
  if (job->parallel.pp * job->parallel.ep * job->parallel.dp > 1) {
    if (!f.weights.empty() || f.profile)
      return Fail(Status::Unimplemented(
          "a distributed run (more than one rank in [parallel]) does not take --weights or --profile yet"));
    if (f.kernel_timeline && tc.device == "cpu")
      return Fail(Status::InvalidArgument("--kernel-timeline measures GPU ranks' kernels; this run's device is cpu"));
    DistFlags d;
    d.config = f.config;
    d.device = f.device;
    d.out_dir = f.out_dir;
    d.steps = f.steps;
    d.threads = f.threads;
    d.timeout_s = f.timeout_s;
    d.kernel_timeline = f.kernel_timeline;
    d.parallel = job->parallel;
    d.ckpt_dir = f.ckpt_dir;
    d.ckpt_every = f.ckpt_every;
    d.resume = f.resume;
    return LaunchDistributedTrain(d, *job);
  }
  if (f.kernel_timeline)
    return Fail(
        Status::Unimplemented("--kernel-timeline is for distributed runs (more than one rank); one process "
                              "has no communication kernels to measure"));
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
  if (f.ckpt_every >= 0) job->checkpoint.every = f.ckpt_every;
  const std::string ckpt_dir = f.ckpt_dir.empty() ? out_dir + "/checkpoints" : f.ckpt_dir;
  std::unique_ptr<AsyncCheckpointer> ckpt;
  if (job->checkpoint.every > 0 || !f.resume.empty()) {
    auto c = AsyncCheckpointer::Open(ckpt_dir, job->checkpoint);
    if (!c.ok()) return Fail(c.status());
    ckpt = std::move(c).value();
  }
  if (!f.resume.empty()) {
    auto m = f.resume == "latest" ? ckpt->catalog().Latest() : ckpt->catalog().Get(f.resume);
    if (!m.ok()) return Fail(m.status().WithContext("--resume " + f.resume + " (checkpoints in " + ckpt_dir + ")"));
    ckpt::ReadStats stats;
    // A checkpoint a distributed run saved has shards in stores this run does not write.
    ReadableStores readable = OpenStoresFor(ckpt_dir, *m, ckpt->stores(), &stats);
    auto snap = ckpt::LoadCheckpoint(*m, readable.stores, &stats);
    if (!snap.ok()) return Fail(snap.status());
    Status st = trainer.Restore(*snap);
    if (!st.ok()) return Fail(st.WithContext("--resume " + m->id));
    if (m->config_hash != ckpt::ConfigHash(job->toml_text))
      std::printf("note: %s was saved under a different config text (hash %s, now %s)\n", m->id.c_str(),
                  m->config_hash.c_str(), ckpt::ConfigHash(job->toml_text).c_str());
    std::printf("resumed from %s: step %lld (%d shards read, %d from a replica after a failure)\n", m->id.c_str(),
                static_cast<long long>(m->step), stats.shards_read, stats.replica_fallbacks);
    for (const std::string& why : stats.failures) std::printf("  replica failure: %s\n", why.c_str());
  }
  if (job->checkpoint.every > 0) {
    Status st = trainer.PrepareCapture();
    if (!st.ok()) return Fail(st);
  }
  ModelParams& params = trainer.model().params();
  std::printf("troupe train: %s on %s\n", f.config.c_str(), be.Describe().c_str());
  std::printf("model: %.2fM parameters, %.2fM active per token; batch %d x %d tokens; %lld training tokens\n",
              CountParams(params) / 1e6, CountActiveParams(job->model, params) / 1e6, tc.batch_size, tc.seq_len,
              static_cast<long long>(trainer.train_tokens()));
  std::printf("unigram baseline (validation cross-entropy of train-set token frequencies): %.4f\n",
              trainer.unigram_baseline());
  std::fflush(stdout);
  double tokens = 0, seconds = 0, last_val = 0, stall_seconds = 0;
  bool evaluated = false;
  const int first_step = trainer.step();
  while (trainer.step() < tc.steps) {
    auto r = trainer.Step();
    if (!r.ok()) return Fail(r.status());
    if (profiler) {
      profiler->Collect();                  // resolve this step's timers (keeps the event pool small)
      if (r->step == 1) profiler->Clear();  // the first step pays for warm-up
    }
    tokens += r->tokens;
    seconds += r->seconds;
    const bool last = r->step == tc.steps;
    if (r->step % tc.log_every == 0 || r->step == 1 || last) {
      std::printf("step %5d/%d | loss %.4f | main %.4f", r->step, tc.steps, r->loss.total, r->loss.main);
      for (double m : r->loss.mtp) std::printf(" | mtp %.4f", m);
      std::printf(" | balance %.2e | lr %.2e | gnorm %.3f | max/mean load %.2f | %.0f tok/s\n", r->loss.balance, r->lr,
                  r->grad_norm, r->max_load_ratio, r->tokens / r->seconds);
    }
    if ((tc.eval_every > 0 && r->step % tc.eval_every == 0) || last) {
      auto val = trainer.Evaluate();
      if (!val.ok()) return Fail(val.status());
      last_val = *val;
      evaluated = true;
      std::printf(
          "step %5d/%d | val_loss %.4f | unigram_baseline %.4f | %.0f tok/s average | memory %.1f MiB "
          "(peak %.1f)\n",
          r->step, tc.steps, *val, trainer.unigram_baseline(), tokens / seconds, be.bytes_in_use() / 1048576.0,
          be.peak_bytes() / 1048576.0);
    }
    if (ckpt) {
      if (auto done = ckpt->Poll()) PrintSave(*done);
      if (job->checkpoint.every > 0 && r->step % job->checkpoint.every == 0) {
        // The stall: wait for the previous save (one staging copy at most) + the device-to-host copy.
        const auto t0 = std::chrono::steady_clock::now();
        if (auto done = ckpt->WaitIdle()) PrintSave(*done);
        // With the latest evaluation's loss.
        auto snap = trainer.Capture(CheckpointMetrics(*r, evaluated ? std::optional<double>(last_val) : std::nullopt));
        if (!snap.ok()) return Fail(snap.status());
        ckpt->Submit(std::move(snap).value());
        const double stall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        stall_seconds += stall;
        std::printf("checkpoint: step %d captured in %.1f ms (training stall); writing in the background\n", r->step,
                    stall * 1e3);
      }
    }
    std::fflush(stdout);
  }
  if (ckpt) {
    if (auto done = ckpt->WaitIdle()) PrintSave(*done);
    if (stall_seconds > 0)
      std::printf("checkpoint stall: %.3f s in all, %.2f%% of training step time\n", stall_seconds,
                  100.0 * stall_seconds / std::max(seconds, 1e-9));
  }
  std::printf("time: %.3f s in %d training steps (%.2f ms per step; checkpoint captures not included)\n", seconds,
              tc.steps - first_step, 1e3 * seconds / std::max(1, tc.steps - first_step));
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

void PrintSave(const SaveResult& r) {
  if (!r.status.ok()) {
    std::printf("checkpoint: save FAILED: %s\n", r.status.message().c_str());
    return;
  }
  const double mb = r.manifest.TotalBytes() / 1048576.0;
  std::printf("checkpoint %s committed: step %lld, %zu tensors, %.1f MiB x %d replica(s) in %.2f s (%.0f MiB/s)",
              r.manifest.id.c_str(), static_cast<long long>(r.manifest.step), r.manifest.tensors.size(), mb,
              r.manifest.replication, r.write_seconds, mb * r.manifest.replication / std::max(r.write_seconds, 1e-9));
  if (!r.dropped.empty()) {
    std::printf("; retention dropped");
    for (const std::string& id : r.dropped) std::printf(" %s", id.c_str());
  }
  std::printf("\n");
}

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
  cmd->add_option("--checkpoint-dir", flags->ckpt_dir,
                  "checkpoint catalog and shard stores (default <out>/checkpoints)");
  cmd->add_option("--checkpoint-every", flags->ckpt_every,
                  "steps between checkpoints (default: the config's checkpoint.every; 0 = none)")
      ->check(IntAtLeast(0));
  cmd->add_option("--resume", flags->resume, "continue from this checkpoint id, or 'latest'");
  AddParallelOptions(*cmd, flags->parallel);
  cmd->add_option("--timeout", flags->timeout_s, "distributed runs: seconds a rank waits for a peer before failing")
      ->check(IntAtLeast(1));
  cmd->add_flag("--kernel-timeline", flags->kernel_timeline,
                "distributed GPU runs: measure from the device's kernel record (CUPTI) how much of the "
                "communication kernels' time compute kernels overlapped");
  cmd->callback([flags, &run] { run = [flags] { return RunTrain(*flags); }; });
}

}  // namespace troupe::cli
