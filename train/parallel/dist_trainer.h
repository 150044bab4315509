// DistributedTrainer: one rank of a pipeline x expert x data parallel run
// (BRIEF §2). Every rank of the job runs one, over one ProcessGroup.
//
// Each Step():
//   1. every rank reads the same global batch (the loader is seeded) and
//      takes its shard's sequences, cut into the layout's micro-batches;
//   2. the rank runs its list of the pipeline schedule (PipelineRunner);
//   3. gradients are summed over every copy of each parameter: DualPipe's
//      two copies of a stage, the embedding the last stage shares for MTP,
//      and the data-parallel replicas (BucketOptimizer: one bucket per set
//      of holders, in one global order);
//   4. the global gradient norm (each element counted once), clipping and
//      AdamW: on the whole bucket by every holder, or under ZeRO-1
//      (parallel.zero1) on one chunk per holder and then all-gathered;
//   5. expert loads are summed over the holders of each routing bias, which
//      then take the same auxiliary-loss-free step everywhere.
// The loss and gradients equal a single-process run of the same global
// batch (tests/dist_trainer_test.cpp).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "configs/config.h"
#include "data/loader.h"
#include "gpu/backend.h"
#include "gpu/model/model.h"
#include "train/parallel/bucket_optimizer.h"
#include "train/parallel/device_comms.h"
#include "train/parallel/ep_exchange.h"
#include "train/parallel/layout.h"
#include "train/parallel/pipeline_runner.h"
#include "train/parallel/process_group.h"
#include "train/trainer.h"

namespace troupe::parallel {

// Where a step's time went on this rank.
struct StepTiming {
  double busy_s = 0;        // this rank, inside pipeline ops
  double pipeline_s = 0;    // step start (a barrier) to the last op's end on the slowest rank
  double bubble_share = 0;  // over all ranks: 1 - sum(busy) / (ranks * pipeline_s)
  double recv_wait_s = 0;   // this rank, blocked in receives, summed over its threads (an F&B pair's two included)
  // Over all ranks, pipeline ops only: receive waits of every chunk (pipeline
  // transfers and expert all-to-alls), and the part of them during which the
  // other chunk of an F&B pair computed (parallel.overlap_pairs).
  double comm_waited_s = 0, comm_hidden_s = 0;
  double sync_s = 0;  // gradient, loss and load reductions after the pipeline
  // Mean op durations over all ranks (s): a forward chunk, a backward chunk
  // (input gradients only when split), an F&B pair, a W chunk (0 when the
  // schedule has none).
  double mean_f_s = 0, mean_b_s = 0, mean_fb_s = 0, mean_w_s = 0;
  // Expert parallelism, over all ranks: the share of token copies whose
  // expert lived on another rank, and the most ranks one token reached
  // (device-limited routing keeps it <= model.topk_group).
  double ep_remote_share = 0;
  int ep_max_ranks_per_token = 0;
  // With the kernel timeline on (EnableKernelTimeline), over all ranks,
  // pipeline ops only, from the device's record of its kernels: the time
  // communication kernels ran, and the part of it during which compute
  // kernels ran too (gpu/kernel_overlap.h).
  double kernel_comm_s = 0, kernel_compute_s = 0, kernel_hidden_s = 0;
};

// Whether parallel.overlap_pairs asks F&B pairs to run their chunks at once
// in this layout ("auto": when ep > 1).
bool OverlapsPairs(const ParallelConfig& p, const Layout& layout);

class DistributedTrainer {
 public:
  // `group` has layout.world() ranks; this process is group.rank(). Fails
  // with a clear Status on a layout the runtime cannot run.
  // `device_comms` (optional) makes the communicators of the device paths
  // instead of NCCL, which parallel.device_comm then no longer decides:
  // tests drive those paths with CPU stand-ins.
  static Expected<std::unique_ptr<DistributedTrainer>> Create(Backend& be, const JobConfig& job, const Layout& layout,
                                                              ProcessGroup& group, int timeout_ms = 60000,
                                                              DeviceCommsMaker device_comms = nullptr);

  // Every rank calls it, or none: from the next step on, timing() holds the
  // device's kernel overlap as well. Unimplemented on a backend without a
  // kernel timeline (the CPU, or no libcupti).
  Status EnableKernelTimeline();

  // One optimizer step. Every rank returns the same report.
  Expected<StepReport> Step();
  // Mean main-head loss over the validation batches (same on every rank).
  Expected<double> Evaluate();

  // Every rank calls it; rank 0 passes a whole-model ModelParams (from
  // AllocateParams) and receives every tensor: each copy-set's lowest rank
  // sends it, expert shards land in their rows. Other ranks pass nullptr.
  Status GatherWeights(ModelParams* whole);

  // Checkpoints (train/parallel/dist_checkpoint.h). A distributed run's
  // checkpoint holds the same tensors as a single-process Trainer::Capture,
  // under the same names and whole-model shapes, so a checkpoint saved in
  // one layout loads into any other (or into `troupe train` on one rank).
  //
  // Collective (every rank, between steps): the pieces this rank writes:
  // each tensor it is the lowest holder of (a routed-expert tensor as its
  // rows of the whole tensor) and that tensor's AdamW moments, gathered from
  // the ZeRO-1 chunks of the tensor's other holders.
  Expected<std::vector<ckpt::HostPiece>> CapturePieces();
  // Where the run stands (the step, the loaders, the seed, the config).
  ckpt::RunState CaptureRunState(const std::map<std::string, double>& metrics) const;
  // Reads rows [row_begin, row_end) of a checkpoint tensor, verified.
  using RowReader = std::function<Expected<std::vector<uint8_t>>(const ckpt::TensorRecord& tensor, int64_t row_begin,
                                                                 int64_t row_end)>;
  // Loads this rank's part of checkpoint `m` (any layout it was saved in)
  // through `read`. Checks the whole-model tensor list, every held tensor's
  // shape and dtype, the seed and the loader positions, and reads everything
  // before it changes anything. Not collective.
  Status Restore(const ckpt::Manifest& m, const RowReader& read);
  // The names of a checkpoint's tensors, in the order Trainer::Capture saves them.
  static std::vector<std::string> CheckpointTensorNames(const ModelConfig& mc);

  int step() const { return step_; }
  const JobConfig& job() const { return job_; }
  const Layout& layout() const { return layout_; }
  const Schedule& schedule() const { return schedule_; }
  // This rank's stage copies, by module.
  std::vector<Model*> modules();
  const std::vector<OpRecord>& timeline() const { return runner_->timeline(); }
  const StepTiming& timing() const { return timing_; }
  // Whether F&B pairs run their two chunks at once (PipelineRunner).
  bool overlaps_pairs() const { return runner_->overlaps_pairs(); }
  // How gradient buckets travel: "nccl" (device to device), "host", or
  // "injected" (Create's device_comms).
  const std::string& device_comm() const { return device_comm_; }
  // How stage-to-stage transfers travel when device_comm() is not "host":
  // "N device links on this rank", or host memory and why; empty otherwise.
  const std::string& pipeline_links() const { return pipeline_links_note_; }
  // Bytes of AdamW state on this rank (ZeRO-1 divides it among the copies).
  size_t optimizer_state_bytes() const { return optimizer_->state_bytes(); }

 private:
  DistributedTrainer(Backend& be, JobConfig job, Layout layout, ProcessGroup& group, int timeout_ms);
  Status Init(const DeviceCommsMaker& device_comms);
  // Every rank runs one job (config, layout, settings), or an error naming the ranks that differ.
  Status CheckSameJob();
  Status UpdateRoutingBiases(double* max_load_ratio);
  Expected<double> SumOverWorld(double v, uint64_t tag);
  // This rank's micro-batches of a global batch (its shard's rows).
  PipelineRunner::MicroTokens MicroBatches(const std::vector<int32_t>& batch) const;

  Backend& be_;
  JobConfig job_;
  Layout layout_;
  ProcessGroup& group_;
  int timeout_ms_;
  int rank_;
  Schedule schedule_;
  std::vector<std::unique_ptr<Model>> modules_;
  std::string device_comm_;  // "nccl" or "host" (parallel.device_comm, resolved)
  std::string pipeline_links_note_;
  std::unique_ptr<DeviceComms> device_comms_;  // before optimizer_, which uses them
  std::unique_ptr<BucketOptimizer> optimizer_;
  std::unique_ptr<GroupExpertExchange> expert_exchange_;
  std::map<std::string, std::vector<int>> holders_;
  std::vector<std::vector<std::string>> gather_senders_;  // [rank] tensors it sends in GatherWeights
  std::unique_ptr<PipelineRunner> runner_;
  std::unique_ptr<data::TokenLoader> train_loader_, val_loader_;
  std::vector<int> world_;
  int step_ = 0;
  bool kernel_timeline_ = false;
  StepTiming timing_;
};

}  // namespace troupe::parallel
