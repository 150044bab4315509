// One pipeline rank running its list of a Schedule (BRIEF §2) for one step.
//
// The rank holds one Model per module (the schedule's Placement::module).
// For each op it takes the inputs the op needs from the process group
// (activations from the previous stage's rank, gradients from the next
// stage's), computes, and sends what the next op elsewhere needs. Sends are
// queued to the group's communication thread and receives are buffered by
// its receive thread, so transfers run while this thread computes; the time
// a Recv still has to wait is what compute did not hide (CommStats).
// Stage-to-stage hand-offs on one rank (DualPipeV's turn) go through the
// group as self-sends, so every edge of the schedule is treated alike.
//
// Split schedules (split_w): B computes input gradients and queues the
// matrices' weight gradients (WeightGradQueue); the chunk's W op runs them,
// and only then are the micro-batch's activations released.
//
// F&B pairs (DualPipe, DualPipeV) run their two chunks at once: F on the
// calling thread, B on a long-lived pair thread. On the CPU each gets half
// the rank's compute threads (Backend::SetCallerShare); on CUDA each issues
// to a stream of its own (Backend::SetCallerLane), forked from and joined to
// the main one around the pair. The chunks belong to different stages (the
// two directions), so they share no parameters or gradients; while one waits
// for an activation, a gradient or an expert all-to-all, the other computes.
// Each device link carries one kind (activations: F; gradients: B), and the
// expert exchange has a communicator per direction, so no communicator is
// driven by both threads. An OverlapMeter on both threads splits each op's
// receive waits into hidden (the other chunk's thread was issuing work) and
// exposed (neither was).
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "gpu/model/model.h"
#include "train/parallel/device_comms.h"
#include "train/parallel/layout.h"
#include "train/parallel/overlap_meter.h"
#include "train/parallel/process_group.h"
#include "train/parallel/schedule.h"

namespace troupe::parallel {

// One op as it ran: seconds since the step's start, and how long of that it
// waited for its inputs with no chunk computing (compute = end - start -
// wait). `waited` sums the receive waits of the op's chunks; `hidden` is the
// part of it during which the other chunk of an F&B pair computed.
struct OpRecord {
  OpKind kind = OpKind::kForward;
  ChunkRef f, b;
  double start = 0, end = 0;
  double wait = 0;
  double waited = 0, hidden = 0;
};

// The device links (world ranks) that carry `layout`'s pipeline transfers,
// or why they cannot: NCCL matches a link's sends and receives by order
// only, so on every link the order its sender issues them (ops in list
// order, an F&B pair's F first) must be the order its receiver takes them.
// Hand-offs between two stages of one rank are not links. Evaluation
// (forward only) issues the activations alone, in the same relative order,
// so it needs no check of its own.
Expected<std::vector<DeviceLink>> PipelineLinks(const Layout& layout, const Schedule& schedule);

// Activation slots each module needs to run `pp_rank`'s list: the most
// micro-batches it holds between their F and their B (W when split) at once.
std::vector<int> SlotsNeeded(const Schedule& schedule, int pp_rank, int modules);

class PipelineRunner {
 public:
  // `modules[i]` runs the stages this rank holds as module i; `world_rank`
  // is this process's rank in `group`; transfers wait at most timeout_ms.
  // `experts`, when the stages' MoE layers are expert-parallel, is checked
  // after every op: a failed all-to-all stops the step there.
  // `overlap_pairs` runs F&B pairs on two threads where the backend allows.
  // `device`, when it holds links (PipelineLinks), carries the transfers to
  // other ranks device to device; a failed step aborts its communicators.
  PipelineRunner(const Layout& layout, const Schedule& schedule, int world_rank, ProcessGroup& group,
                 std::vector<Model*> modules, int timeout_ms, const ExpertExchange* experts = nullptr,
                 bool overlap_pairs = true, DeviceComms* device = nullptr);
  ~PipelineRunner();

  // Tokens of micro-batch m: [micro_batch_size, window] for this rank's shard.
  using MicroTokens = std::function<const int32_t*(int micro)>;

  // Every op of this rank's list, forward and backward. Afterwards loss()
  // holds this rank's share of the step's loss sums and loads() its modules'
  // expert loads summed over micro-batches.
  Status RunTrainStep(const MicroTokens& tokens, const LossWeights& w, const LossScale& scale);
  // The forward ops only (evaluation: main head only, no MTP).
  Status RunForwardOnly(const MicroTokens& tokens, const LossWeights& w);

  const StageLoss& loss() const { return loss_; }
  // [module][MoE layer][expert]
  const std::vector<std::vector<std::vector<int64_t>>>& loads() const { return loads_; }
  const std::vector<OpRecord>& timeline() const { return timeline_; }
  // Whether F&B pairs run their chunks at once (overlap asked, backend able).
  bool overlaps_pairs() const { return pair_thread_ != nullptr; }

 private:
  class PairThread;
  Status RunPair(const Op& op, const MicroTokens& tokens, const LossWeights& w, const LossScale& scale);
  Status Forward(ChunkRef c, const MicroTokens& tokens, const LossWeights& w, bool train);
  Status Backward(ChunkRef c, const LossScale& scale);
  Status Weight(ChunkRef c);
  int PeerOf(int pp_rank) const;
  // `to`/`c`: the chunk the tensor is for, named in the tag and in errors.
  Status Receive(int pp_rank, TagKind kind, ChunkRef c, Tensor& into);
  Status SendTensor(int pp_rank, TagKind kind, ChunkRef to, const Tensor& t);
  DeviceComm* LinkOf(int from, int to, TagKind kind) const;
  Status WaitForSends();
  Status TrainOps(const MicroTokens& tokens, const LossWeights& w, const LossScale& scale);
  Status ForwardOps(const MicroTokens& tokens, const LossWeights& w);
  Status AbortLinksOnFailure(Status s);
  void AddLoss(const StageLoss& l);
  // Slot bookkeeping, shared by an F&B pair's two threads (book_mu_).
  Expected<int> TakeSlot(int module, ChunkRef c);
  void ReleaseSlot(int module, int slot);

  const Layout& layout_;
  const Schedule& schedule_;
  int world_rank_;
  int pp_rank_;
  ProcessGroup& group_;
  std::vector<Model*> modules_;
  int timeout_ms_;
  const ExpertExchange* experts_;
  DeviceComms* device_;                                      // null, or without links: transfers go through group_
  std::vector<std::vector<int>> free_slots_;                 // [module]
  std::map<std::pair<int, int>, int> slot_of_;               // (micro, stage) -> slot
  std::map<std::pair<int, int>, WeightGradQueue> deferred_;  // (micro, stage) -> its W
  StageLoss loss_;
  std::vector<std::vector<std::vector<int64_t>>> loads_;
  std::vector<OpRecord> timeline_;
  std::mutex book_mu_;  // free_slots_, slot_of_, deferred_, loss_, loads_ while a pair runs
  OverlapMeter meter_{2};
  std::unique_ptr<PairThread> pair_thread_;  // null: pairs run F then B on this thread
};

}  // namespace troupe::parallel
