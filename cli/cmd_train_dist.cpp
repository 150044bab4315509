// Distributed `troupe train`: the local launcher and the per-rank process.
//
//   troupe train --config C --pp 4 --dp 2 --schedule dualpipe
//     ├─ <out>/dist/keys/rank-<i>.key   one CURVE key pair per rank (0600)
//     ├─ <out>/dist/rendezvous/          addresses, exchanged through files
//     └─ fork/exec `troupe rank --rank i ...` x world; rank 0 prints the
//        step lines, every rank logs to <out>/dist/rank-<i>.log
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "actors/transport/keys.h"
#include "cli/child_process.h"
#include "cli/cli_util.h"
#include "cli/train_dist.h"
#include "coordinator/process_util.h"
#include "gpu/cuda/cuda_info.h"
#include "storage/model_weights.h"
#include "train/parallel/device_comms.h"
#include "train/parallel/dist_checkpoint.h"
#include "train/parallel/dist_trainer.h"
#include "train/parallel/process_group.h"

namespace troupe::cli {
namespace {

namespace fs = std::filesystem;

struct RankFlags {
  DistFlags dist;
  ParallelFlags parallel;
  int rank = -1;
  int world = 0;
  std::string run_dir;
};

std::string Tail(const std::string& path, size_t lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) out += "    " + all[i] + "\n";
  return out;
}

std::vector<std::string> PassOn(const DistFlags& f) {
  std::vector<std::string> a = {"--config",
                                f.config,
                                "--pp",
                                std::to_string(f.parallel.pp),
                                "--ep",
                                std::to_string(f.parallel.ep),
                                "--dp",
                                std::to_string(f.parallel.dp),
                                "--schedule",
                                f.parallel.schedule,
                                "--micro-batches",
                                std::to_string(f.parallel.micro_batches),
                                "--timeout",
                                std::to_string(f.timeout_s)};
  if (!f.device.empty()) a.insert(a.end(), {"--device", f.device});
  if (f.steps > 0) a.insert(a.end(), {"--steps", std::to_string(f.steps)});
  if (f.threads >= 0) a.insert(a.end(), {"--threads", std::to_string(f.threads)});
  a.insert(a.end(), {"--checkpoint-dir", f.ckpt_dir});
  if (f.ckpt_every >= 0) a.insert(a.end(), {"--checkpoint-every", std::to_string(f.ckpt_every)});
  if (!f.resume.empty()) a.insert(a.end(), {"--resume", f.resume});
  if (f.kernel_timeline) a.push_back("--kernel-timeline");
  return a;
}

void PrintTimingSummary(const parallel::DistributedTrainer& t, const std::vector<parallel::StepTiming>& steps) {
  if (steps.size() < 2) return;
  // Step 1 pays for first touches of memory: leave it out.
  parallel::StepTiming avg;
  for (size_t i = 1; i < steps.size(); ++i) {
    avg.bubble_share += steps[i].bubble_share;
    avg.pipeline_s += steps[i].pipeline_s;
    avg.recv_wait_s += steps[i].recv_wait_s;
    avg.sync_s += steps[i].sync_s;
    avg.mean_f_s += steps[i].mean_f_s;
    avg.mean_b_s += steps[i].mean_b_s;
    avg.mean_fb_s += steps[i].mean_fb_s;
    avg.mean_w_s += steps[i].mean_w_s;
    avg.comm_waited_s += steps[i].comm_waited_s;
    avg.comm_hidden_s += steps[i].comm_hidden_s;
    avg.kernel_comm_s += steps[i].kernel_comm_s;
    avg.kernel_hidden_s += steps[i].kernel_hidden_s;
    avg.kernel_compute_s += steps[i].kernel_compute_s;
  }
  const double n = static_cast<double>(steps.size() - 1);
  const parallel::Layout& l = t.layout();
  std::printf(
      "pipeline (steps 2..%zu, means): %.1f ms per step in the schedule, %.1f ms in gradient sync; "
      "F %.2f ms, B %.2f ms",
      steps.size(), 1e3 * avg.pipeline_s / n, 1e3 * avg.sync_s / n, 1e3 * avg.mean_f_s / n, 1e3 * avg.mean_b_s / n);
  if (avg.mean_fb_s > 0) std::printf(", F&B %.2f ms", 1e3 * avg.mean_fb_s / n);
  if (avg.mean_w_s > 0) std::printf(", W %.2f ms", 1e3 * avg.mean_w_s / n);
  std::printf("\n");
  const bool pairs = avg.mean_fb_s > 0;
  std::printf("communication (steps 2..%zu): chunks waited %.1f ms per step for transfers, summed over ranks",
              steps.size(), 1e3 * avg.comm_waited_s / n);
  if (pairs) {
    std::printf("; %.1f%% of it hidden behind the other chunk of an F&B pair (%s)",
                avg.comm_waited_s > 0 ? 100.0 * avg.comm_hidden_s / avg.comm_waited_s : 0.0,
                t.overlaps_pairs() ? "pairs on two threads" : "pairs run F then B");
  }
  std::printf("\n");
  if (avg.kernel_comm_s > 0)
    std::printf(
        "device timeline (steps 2..%zu, per step, summed over ranks): communication kernels ran %.1f ms, compute "
        "kernels %.1f ms; compute ran during %.1f ms of the communication (%.1f%% of it hidden)\n",
        steps.size(), 1e3 * avg.kernel_comm_s / n, 1e3 * avg.kernel_compute_s / n, 1e3 * avg.kernel_hidden_s / n,
        100.0 * avg.kernel_hidden_s / avg.kernel_comm_s);
  if (l.pp < 2) return;
  // The table's B is a whole backward and its F&B an F paired with a whole
  // backward; split runs measured B and F&B without their W.
  parallel::OpCosts costs;
  costs.f = avg.mean_f_s / n;
  costs.w = avg.mean_w_s / n;
  costs.b = avg.mean_b_s / n + costs.w;
  costs.fb = avg.mean_fb_s > 0 ? avg.mean_fb_s / n + costs.w : -1;
  const double formula = parallel::FormulaBubble(l.schedule, l.pp, costs);
  const double busy = l.micro_batches * (costs.f + costs.b);
  auto sim = parallel::Simulate(t.schedule(), costs);
  double sim_share = 0;
  if (sim.ok()) {
    double idle = 0;
    for (double b : sim->bubble) idle += b;
    sim_share = idle / (sim->bubble.size() * sim->makespan);
  }
  std::printf(
      "bubble (%s, pp=%d, %d micro-batches): measured %.1f%% of the schedule's time on average over "
      "ranks; the table's formula predicts %.1f%% ((bubble %.2f ms) / (bubble + C(F+B))), the "
      "schedule simulated with the measured chunk times %.1f%%; receive waits %.1f ms per step on rank 0 (its threads "
      "summed)\n",
      (std::string(parallel::ScheduleKindName(l.schedule)) + (l.split_w ? ", B/W split" : "")).c_str(), l.pp,
      l.micro_batches, 100.0 * avg.bubble_share / n, 100.0 * formula / (formula + busy), 1e3 * formula,
      100.0 * sim_share, 1e3 * avg.recv_wait_s / n);
}

int RunRank(const RankFlags& f) {
  auto job = LoadJob(f.dist.config);
  if (!job.ok()) return Fail(job.status());
  TrainConfig& tc = job->train;
  if (f.dist.steps > 0) tc.steps = f.dist.steps;
  if (!f.dist.device.empty()) tc.device = f.dist.device;
  f.parallel.ApplyTo(job->parallel);  // the flags; zero1 and split_w stay the config's
  if (f.dist.threads >= 0) {
    tc.threads = f.dist.threads;
  } else {
    tc.threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, f.world));
  }
  auto layout = parallel::PlanLayout(job->model, tc, job->parallel, f.world);
  if (!layout.ok()) return Fail(layout.status());
  auto key = transport::ReadKeyPair(f.run_dir + "/keys/rank-" + std::to_string(f.rank) + ".key");
  if (!key.ok()) return Fail(key.status());
  // One GPU per rank, round robin over this machine's.
  const int gpus = tc.device == "cpu" ? 0 : CudaDeviceCount();
  auto backend = MakeBackend(tc.device, tc.threads, "fp32", parallel::GpuOfRank(f.rank, gpus));
  if (!backend.ok()) return Fail(backend.status());
  const bool shared_gpus = (*backend)->device() == DeviceKind::kCuda && f.world > gpus;
  if (shared_gpus && job->parallel.device_comm == "nccl") {
    // NCCL refuses two ranks of one host on one GPU. Told that each rank is a
    // host of its own, it connects them over its socket transport (loopback)
    // instead: slow, but real NCCL, which is how its path is tested on one GPU.
    ::setenv("NCCL_HOSTID", ("troupe-rank-" + std::to_string(f.rank)).c_str(), 1);
    ::setenv("NCCL_SOCKET_IFNAME", "lo", 0);
    ::setenv("NCCL_IB_DISABLE", "1", 0);  // InfiniBand/RoCE cards would be picked before loopback sockets
  }
  parallel::FileRendezvous rendezvous(f.run_dir + "/rendezvous");
  auto group =
      parallel::CreateZmqGroup(f.rank, f.world, *key, "tcp://127.0.0.1:0", rendezvous, 1000 * f.dist.timeout_s);
  if (!group.ok()) return Fail(group.status().WithContext("rank " + std::to_string(f.rank)));
  auto trainer = parallel::DistributedTrainer::Create(**backend, *job, *layout, **group, 1000 * f.dist.timeout_s);
  if (!trainer.ok()) return Fail(trainer.status());
  parallel::DistributedTrainer& t = **trainer;
  if (f.dist.kernel_timeline) {
    Status on = t.EnableKernelTimeline();
    if (!on.ok()) return Fail(on.WithContext("--kernel-timeline"));
  }
  const bool lead = f.rank == 0;
  if (lead) {
    std::printf("troupe train: %s on %d ranks (processes over CURVE ZeroMQ), %s per rank\n", f.dist.config.c_str(),
                f.world, (*backend)->Describe().c_str());
    std::printf("%s", layout->Explain().c_str());
    std::printf("gradient buckets: %s\n",
                t.device_comm() == "nccl"
                    ? (shared_gpus ? "NCCL, device to device (ranks share GPUs: over NCCL's socket transport)"
                                   : "NCCL, device to device")
                    : "host memory, ring collectives over ZeroMQ");
    if (!t.pipeline_links().empty()) std::printf("pipeline transfers: %s\n", t.pipeline_links().c_str());
    std::fflush(stdout);
  }
  if (f.dist.ckpt_every >= 0) job->checkpoint.every = f.dist.ckpt_every;
  const std::string ckpt_dir =
      f.dist.ckpt_dir.empty() ? (fs::path(f.run_dir).parent_path() / "checkpoints").string() : f.dist.ckpt_dir;
  std::unique_ptr<parallel::DistCheckpointer> ckpt;
  if (job->checkpoint.every > 0 || !f.dist.resume.empty()) {
    auto c = parallel::DistCheckpointer::Open(ckpt_dir, job->checkpoint, **group, 1000 * f.dist.timeout_s);
    if (!c.ok()) return Fail(c.status().WithContext("rank " + std::to_string(f.rank)));
    ckpt = std::move(c).value();
  }
  if (!f.dist.resume.empty()) {
    ckpt::ReadStats stats;
    auto m = ckpt->Resume(f.dist.resume, t, &stats);
    if (!m.ok())
      return Fail(m.status().WithContext("--resume " + f.dist.resume + " (checkpoints in " + ckpt_dir + ")"));
    std::printf(
        "resumed from %s (saved at pp=%d ep=%d dp=%d): step %lld; rank %d read %d shards, %d from a replica after a "
        "failure\n",
        m->id.c_str(), m->layout.pp, m->layout.ep, m->layout.dp, static_cast<long long>(m->step), f.rank,
        stats.shards_read, stats.replica_fallbacks);
    for (const std::string& why : stats.failures) std::printf("  replica failure: %s\n", why.c_str());
  }
  auto report_saves = [&](std::optional<SaveResult> done) {
    if (done && (lead || !done->status.ok())) PrintSave(*done);
  };
  double stall_seconds = 0;
  std::vector<parallel::StepTiming> timings;
  double tokens = 0, seconds = 0, last_val = 0;
  while (t.step() < tc.steps) {
    auto r = t.Step();
    if (!r.ok()) return Fail(r.status().WithContext("rank " + std::to_string(f.rank)));
    timings.push_back(t.timing());
    tokens += r->tokens;
    seconds += r->seconds;
    const bool last = r->step == tc.steps;
    if (lead && (r->step % tc.log_every == 0 || r->step == 1 || last)) {
      std::printf("step %5d/%d | loss %.6f | main %.4f", r->step, tc.steps, r->loss.total, r->loss.main);
      for (double m : r->loss.mtp) std::printf(" | mtp %.4f", m);
      std::printf(" | balance %.2e | lr %.2e | gnorm %.5f | max/mean load %.2f | bubble %.1f%%", r->loss.balance, r->lr,
                  r->grad_norm, r->max_load_ratio, 100.0 * t.timing().bubble_share);
      if (layout->ep > 1)
        std::printf(" | experts: %.0f%% of token copies sent to another rank, <= %d ranks per token",
                    100.0 * t.timing().ep_remote_share, t.timing().ep_max_ranks_per_token);
      std::printf(" | %.0f tok/s\n", r->tokens / r->seconds);
    }
    if ((tc.eval_every > 0 && r->step % tc.eval_every == 0) || last) {
      auto val = t.Evaluate();
      if (!val.ok()) return Fail(val.status().WithContext("rank " + std::to_string(f.rank)));
      last_val = *val;
      if (lead)
        std::printf("step %5d/%d | val_loss %.4f | %.0f tok/s average\n", r->step, tc.steps, *val, tokens / seconds);
    }
    if (ckpt) {
      report_saves(ckpt->Poll());
      if (job->checkpoint.every > 0 && r->step % job->checkpoint.every == 0) {
        // The stall: this rank's previous save, the moments' gather and the device-to-host copies.
        const auto t0 = std::chrono::steady_clock::now();
        report_saves(ckpt->WaitIdle());
        std::string skipped;
        Status st = ckpt->Save(t, CheckpointMetrics(*r, last_val > 0 ? std::optional<double>(last_val) : std::nullopt),
                               &skipped);
        if (!st.ok()) return Fail(st.WithContext("rank " + std::to_string(f.rank) + " checkpoint"));
        const double stall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        stall_seconds += stall;
        if (lead && skipped.empty())
          std::printf("checkpoint: step %d captured in %.1f ms (training stall); writing in the background\n", r->step,
                      stall * 1e3);
        if (lead && !skipped.empty()) std::printf("checkpoint: step %d NOT saved: %s\n", r->step, skipped.c_str());
      }
    }
    std::fflush(stdout);
  }
  if (ckpt) {
    report_saves(ckpt->WaitIdle());
    if (lead && stall_seconds > 0)
      std::printf("checkpoint stall: %.3f s in all, %.2f%% of training step time\n", stall_seconds,
                  100.0 * stall_seconds / std::max(seconds, 1e-9));
  }
  if (lead) {
    PrintTimingSummary(t, timings);
    std::printf("done: val_loss %.4f; %.0f training tokens/s over %d ranks\n", last_val, tokens / seconds, f.world);
  }
  // The whole model's weights, gathered on rank 0, as `troupe train` writes them.
  std::optional<ModelParams> whole;
  if (lead) {
    auto params = AllocateParams(**backend, job->model, DType::kF32);
    if (!params.ok()) return Fail(params.status().WithContext("weights for export"));
    whole = std::move(params).value();
  }
  Status gathered = t.GatherWeights(whole ? &*whole : nullptr);
  if (!gathered.ok()) return Fail(gathered.WithContext("rank " + std::to_string(f.rank)));
  if (lead) {
    const std::string path = (fs::path(f.run_dir).parent_path() / "model.safetensors").string();
    Status st = ExportWeights(**backend, job->model, *whole, path,
                              {{"config", job->toml_text}, {"step", std::to_string(t.step())}});
    if (!st.ok()) return Fail(st);
    std::printf("weights: %s\n", path.c_str());
  }
  return 0;
}

// OK when `dir` holds a committed checkpoint `which` ("latest" or an id).
Status FindCheckpoint(const std::string& dir, const std::string& which) {
  std::error_code ec;
  if (!fs::is_directory(dir + "/catalog", ec)) return Status::NotFound("no checkpoint catalog under " + dir);
  TROUPE_ASSIGN_OR_RETURN(auto catalog, ckpt::Catalog::Open(dir));
  return (which == "latest" ? catalog->Latest() : catalog->Get(which)).status();
}

}  // namespace

void ParallelFlags::ApplyTo(ParallelConfig& p) const {
  if (pp) p.pp = *pp;
  if (ep) p.ep = *ep;
  if (dp) p.dp = *dp;
  if (micro_batches) p.micro_batches = *micro_batches;
  if (schedule) p.schedule = *schedule;
}

void AddParallelOptions(CLI::App& cmd, ParallelFlags& f) {
  cmd.add_option("--pp", f.pp, "pipeline ranks (default: the config's parallel.pp)")->check(IntAtLeast(1));
  cmd.add_option("--ep", f.ep, "expert-parallel ranks per stage (parallel.ep)")->check(IntAtLeast(1));
  cmd.add_option("--dp", f.dp, "data-parallel replicas (parallel.dp)")->check(IntAtLeast(1));
  cmd.add_option("--schedule", f.schedule, "pipeline schedule: 1f1b, zb1p, dualpipe or dualpipev");
  cmd.add_option("--micro-batches", f.micro_batches, "micro-batches per pipeline per step (0: the schedule's smallest)")
      ->check(IntAtLeast(0));
}

int LaunchDistributedTrain(const DistFlags& flags, const JobConfig& job) {
  auto wait_for_stop = cluster::BlockStopSignals();
  const int world = job.parallel.pp * job.parallel.ep * job.parallel.dp;
  // Refuse a bad layout here, once, rather than in every rank.
  auto layout = parallel::PlanLayout(job.model, job.train, job.parallel, world);
  if (!layout.ok()) return Fail(layout.status());
  const std::string out = flags.out_dir.empty() ? "runs/" + fs::path(flags.config).stem().string() : flags.out_dir;
  const std::string dir = out + "/dist";
  DistFlags pass = flags;
  if (pass.ckpt_dir.empty()) pass.ckpt_dir = out + "/checkpoints";
  // A checkpoint that is not there is refused here, once, before any folder
  // is made or any rank starts.
  if (!pass.resume.empty()) {
    Status found = FindCheckpoint(pass.ckpt_dir, pass.resume);
    if (!found.ok())
      return Fail(found.WithContext("--resume " + pass.resume + " (checkpoints in " + pass.ckpt_dir + ")"));
  }
  std::error_code ec;
  fs::remove_all(dir + "/rendezvous", ec);  // addresses of an earlier run must not be taken for this one's
  fs::create_directories(dir + "/rendezvous", ec);
  fs::create_directories(dir + "/keys", ec);
  if (ec) return Fail(Status::IOError("cannot create " + dir + ": " + ec.message()));
  fs::permissions(dir + "/keys", fs::perms::owner_all, ec);
  for (int r = 0; r < world; ++r) {
    auto key = transport::GenerateKeyPair();
    if (!key.ok()) return Fail(key.status());
    Status st = transport::WriteKeyPair(dir + "/keys/rank-" + std::to_string(r) + ".key", *key);
    if (!st.ok()) return Fail(st);
  }
  std::vector<pid_t> pids;
  std::vector<std::string> logs;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> args = {"troupe",    "rank", "--rank", std::to_string(r), "--world", std::to_string(world),
                                     "--run-dir", dir};
    for (std::string& a : PassOn(pass)) args.push_back(std::move(a));
    logs.push_back(dir + "/rank-" + std::to_string(r) + ".log");
    fs::remove(logs.back(), ec);
    auto pid = Spawn(args, logs.back(), /*inherit_stdout=*/r == 0);
    if (!pid.ok()) {
      StopChildren(pids, std::chrono::seconds(5));
      return Fail(pid.status());
    }
    pids.push_back(*pid);
  }
  // Wait for every rank; the first failure (or Ctrl-C) stops the rest.
  int failed_rank = -1, failed_code = 0;
  size_t running = pids.size();
  while (running > 0) {
    if (wait_for_stop(0)) {
      std::fprintf(stderr, "troupe train: stopping %zu ranks\n", running);
      StopChildren(pids, std::chrono::seconds(5));
      return 130;
    }
    for (int r = 0; r < world; ++r) {
      if (pids[r] <= 0) continue;
      int status = 0;
      if (::waitpid(pids[r], &status, WNOHANG) != pids[r]) continue;
      pids[r] = -1;
      --running;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (code != 0 && failed_rank < 0) {
        failed_rank = r;
        failed_code = code;
        StopChildren(pids, std::chrono::seconds(5));
        running = 0;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (failed_rank >= 0) {
    std::fprintf(stderr,
                 "troupe: error: rank %d of %d failed (%s %d); the other ranks were stopped. Its log %s ends:\n%s",
                 failed_rank, world, failed_code > 128 ? "signal" : "exit code",
                 failed_code > 128 ? failed_code - 128 : failed_code, logs[failed_rank].c_str(),
                 Tail(logs[failed_rank], 5).c_str());
    return 1;
  }
  return 0;
}

void AddRankCommand(CLI::App& app, RunFn& run) {
  auto flags = std::make_shared<RankFlags>();
  CLI::App* cmd = app.add_subcommand("rank", "one rank of a distributed troupe train (started by troupe train)");
  cmd->group("");  // internal: not listed in --help
  cmd->add_option("--config", flags->dist.config, "job config (TOML)")->required();
  cmd->add_option("--rank", flags->rank, "this process's rank")->required()->check(IntAtLeast(0));
  cmd->add_option("--world", flags->world, "ranks in the job")->required()->check(IntAtLeast(1));
  cmd->add_option("--run-dir", flags->run_dir, "keys/ and rendezvous/ of the job")->required();
  cmd->add_option("--device", flags->dist.device, "auto, cpu or cuda");
  cmd->add_option("--steps", flags->dist.steps, "optimizer steps")->check(IntAtLeast(1));
  cmd->add_option("--threads", flags->dist.threads, "CPU threads of this rank")->check(IntAtLeast(0));
  cmd->add_option("--timeout", flags->dist.timeout_s, "seconds to wait for a peer")->check(IntAtLeast(1));
  cmd->add_option("--checkpoint-dir", flags->dist.ckpt_dir,
                  "checkpoint catalog and shard stores (default: checkpoints/ beside --run-dir)");
  cmd->add_option("--checkpoint-every", flags->dist.ckpt_every, "steps between checkpoints")->check(IntAtLeast(0));
  cmd->add_option("--resume", flags->dist.resume, "continue from this checkpoint id, or 'latest'");
  cmd->add_flag("--kernel-timeline", flags->dist.kernel_timeline, "measure communication kernels' overlap (CUPTI)");
  AddParallelOptions(*cmd, flags->parallel);
  cmd->callback([flags, &run] {
    run = [flags] {
      if (flags->rank >= flags->world)
        return Fail(Status::InvalidArgument("--rank " + std::to_string(flags->rank) + " is not below --world " +
                                            std::to_string(flags->world)));
      return RunRank(*flags);
    };
  });
}

}  // namespace troupe::cli
