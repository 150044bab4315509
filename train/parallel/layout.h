// The planner: which rank runs which part of the model (BRIEF §2).
//
// A distributed run has world = pp * ep * dp ranks. Rank coordinates:
//
//   rank = (dp_rank * ep + ep_rank) * pp + pp_rank
//
// pp_rank picks the pipeline position (the schedule's rank; it holds one
// stage, or two under DualPipe/DualPipeV). Every (dp_rank, ep_rank) pair is a
// data shard: it runs its own sequences of the global batch. The ep ranks of
// one stage split the routed experts between them (a routing group never
// spans two ranks); dp copies the whole pp x ep arrangement.
//
// Stages are contiguous runs of main layers, cut so that the slowest stage is
// as fast as possible under a FLOP estimate in which the last stage also pays
// for the output head and the MTP modules.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "configs/config.h"
#include "gpu/model/params.h"
#include "train/parallel/schedule.h"

namespace troupe::parallel {

struct RankCoord {
  int pp_rank = 0;
  int ep_rank = 0;
  int dp_rank = 0;
};

struct Layout {
  int pp = 1, ep = 1, dp = 1;
  ScheduleKind schedule = ScheduleKind::k1F1B;
  bool split_w = false;            // B and W run as separate chunks (never for 1F1B, which has nowhere to put W)
  int micro_batches = 1;           // per pipeline per step
  int micro_batch_size = 1;        // sequences per micro-batch
  int global_batch = 1;            // sequences per step, all shards together (train.batch_size)
  std::vector<StageSpan> stages;   // [stage]: 2 * pp of them under DualPipeV, else pp
  std::vector<double> stage_cost;  // [stage] the planner's relative forward cost
  int idle_workers = 0;            // workers the layout leaves unused

  int world() const { return pp * ep * dp; }
  int shards() const { return ep * dp; }
  RankCoord CoordOf(int rank) const;
  int RankOf(const RankCoord& c) const;
  // Which slice of the global batch a rank's micro-batches come from.
  int ShardOf(int rank) const;
  // The stages a pipeline rank holds, by module (the schedule's Placement::module).
  std::vector<int> StagesOf(int pp_rank) const;
  // For every parameter `rank` holds: the world ranks holding the same copy
  // of it, ascending (its gradient is summed over them, its optimizer state
  // kept identical on them). Routed-expert tensors are shards: only ranks
  // with the same ep_rank hold the same one.
  std::map<std::string, std::vector<int>> ParamHolders(const ModelConfig& cfg, int rank) const;
  // The stage span pp rank `rank` runs as module `module`, with its expert share.
  StageSpan SpanOf(int rank, int module) const;
  // The expert-parallel group of `rank`: the ranks of its stage and data
  // replica, by ep_rank.
  std::vector<int> ExpertGroupOf(int rank) const;
  // A few lines a person can check: ranks, schedule, micro-batches, the
  // layers of each stage and where its copies live.
  std::string Explain() const;
};

// Checks the job's [parallel] section against the model, the batch and the
// number of workers (parallel.dp = 0: as many replicas as fit); refuses an
// impossible layout with the reason.
Expected<Layout> PlanLayout(const ModelConfig& model, const TrainConfig& train, const ParallelConfig& parallel,
                            int workers);

}  // namespace troupe::parallel
