// troupe train with a [parallel] layout of more than one rank: the launcher
// (one child process per rank on this machine) and the hidden `troupe rank`
// command each child runs.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "configs/config.h"

namespace troupe {
struct SaveResult;
}

namespace troupe::cli {

// --pp --ep --dp --schedule --micro-batches: each overrides its [parallel] key.
struct ParallelFlags {
  std::optional<int> pp, ep, dp, micro_batches;
  std::optional<std::string> schedule;
  void ApplyTo(ParallelConfig& p) const;
};
void AddParallelOptions(CLI::App& cmd, ParallelFlags& flags);

// Flags `troupe train` passes on to every rank.
struct DistFlags {
  std::string config;
  std::string device;
  std::string out_dir;
  int steps = -1;
  int threads = -1;  // per rank; default: the cores split over the ranks
  int timeout_s = 60;
  ParallelConfig parallel;
  std::string ckpt_dir;  // default <out>/checkpoints
  int ckpt_every = -1;   // default: the config's checkpoint.every
  std::string resume;    // a checkpoint id, or "latest"
  bool kernel_timeline = false;  // DistributedTrainer::EnableKernelTimeline on every rank
};

// One line on a finished checkpoint save (committed, or why not).
void PrintSave(const SaveResult& r);

// Starts job.parallel's world of ranks as processes of this binary over
// CURVE ZeroMQ on loopback, prints rank 0's output, waits; a failing rank
// stops the others and its log tail is printed. Returns the exit code.
int LaunchDistributedTrain(const DistFlags& flags, const JobConfig& job);

void AddRankCommand(CLI::App& app, RunFn& run);

}  // namespace troupe::cli
