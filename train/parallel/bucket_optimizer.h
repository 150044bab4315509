// Gradient reduction and AdamW over parameter buckets, with optional ZeRO-1.
//
// A bucket is every trainable parameter held by one set of ranks (its
// "holders": DualPipe's two copies of a stage, the data-parallel replicas,
// the last stage's copy of the embedding). Per bucket and step:
//
//   plain:  flat grads ──all-reduce──▶ every holder runs AdamW on the whole
//           bucket (identical inputs, identical results; m and v in full)
//   ZeRO-1: flat grads ──reduce-scatter──▶ holder i owns chunk i (ChunkOf):
//           AdamW on its chunk only (m and v for that chunk only: 1/n of the
//           optimizer memory) ──all-gather──▶ every holder's weights
//
// Local duplicates (one rank holding a tensor twice) are summed before the
// network and written back after it, so copies stay bit-identical. Buckets
// run in one global order (sorted holder lists), so no two ranks wait on
// each other in opposite orders.
//
// Two paths for the bytes. Host: each bucket is copied into host memory and
// reduced over the process group (ring collectives, collectives.h). Device
// (given DeviceComms, i.e. NCCL): each bucket is packed into one flat device
// buffer, reduced by NCCL on its own stream (all-reduce, or per-chunk reduce
// and broadcast under ZeRO-1, whose chunks are uneven) and unpacked, never
// leaving the GPU. Every bucket is packed before the first reduction is
// queued: the backend's stream waits for each reduction, so packing between
// them would wait too.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "configs/config.h"
#include "gpu/backend.h"
#include "gpu/model/params.h"
#include "train/parallel/device_comms.h"
#include "train/parallel/process_group.h"

namespace troupe::parallel {

struct Bucket {
  std::vector<int> holders;        // world ranks, ascending
  std::vector<std::string> names;  // parameters, in ListParams order
};

class BucketOptimizer {
 public:
  // `params[i]` / `grads[i]` are this rank's module i tensors; `buckets` are
  // the whole job's (every rank passes the same list). Allocates m and v.
  // `device` (optional, outliving this): the NCCL communicators of the
  // buckets' holder groups; then every bucket takes the device path.
  static Expected<std::unique_ptr<BucketOptimizer>> Create(Backend& be, ProcessGroup& group,
                                                           std::vector<Bucket> buckets,
                                                           std::vector<ModelParams*> params,
                                                           std::vector<ModelParams*> grads, bool zero1, int timeout_ms,
                                                           DeviceComms* device = nullptr);

  // Sums each bucket's gradients over its holders (all-reduce, or
  // reduce-scatter under ZeRO-1, where afterwards only this rank's chunk of
  // the local gradient tensors holds the sum).
  Status ReduceGradients();
  // Squared norm of the gradients this rank is responsible for (each
  // element counted on exactly one rank); sum it over the world.
  double OwnedSquaredNorm();
  // AdamW on this rank's part, then (ZeRO-1) all-gather of the weights.
  Status Step(const TrainConfig& tc, double lr, double clip_scale, int step);
  // Bytes of AdamW state (m and v) on this rank.
  size_t state_bytes() const { return state_bytes_; }

  // One tensor's AdamW moments, flat, in the shape this rank holds the tensor.
  struct TensorState {
    std::string name;
    std::vector<float> exp_avg, exp_avg_sq;
  };
  // Collective over every bucket's holders (every rank calls it between
  // steps): each bucket's lowest holder receives the bucket's whole AdamW
  // state (under ZeRO-1 the other holders send it their chunks) and returns
  // it by tensor; the other holders return nothing for that bucket.
  Expected<std::vector<TensorState>> GatherStateToLeads();
  // Elements [begin, end) of a tensor's exp_avg and exp_avg_sq.
  using StateReader = std::function<Expected<std::pair<std::vector<float>, std::vector<float>>>(
      const std::string& name, int64_t begin, int64_t end)>;
  // Sets this rank's part of the AdamW state from `read` (element ranges in
  // the shape this rank holds each tensor). Everything is read before
  // anything changes, so a failed read leaves the state as it was.
  Status LoadState(const StateReader& read);

 private:
  struct Piece {  // the part of one tensor inside this rank's chunk
    std::string name;
    std::vector<Tensor*> params, grads;  // the local copies
    int64_t begin = 0, end = 0;          // element range in the tensor
    int64_t state_offset = 0;            // where its m and v start in the bucket's state
    bool weight_decay = false;
  };
  struct Local {       // one bucket as this rank sees it
    size_t index = 0;  // in the global list (the tag)
    const Bucket* bucket = nullptr;
    int64_t length = 0;  // elements in the bucket
    int64_t chunk_begin = 0, chunk_end = 0;
    std::vector<std::vector<Tensor*>> params, grads;  // [name] local copies
    std::vector<Piece> pieces;
    Tensor m, v;  // [chunk, 1]
    // Device path: the holders' communicator (null for a bucket of one
    // holder), the packed bucket [length, 1] and every holder's chunk bounds.
    DeviceComm* comm = nullptr;
    Tensor flat;
    std::vector<int64_t> bounds;
  };

  BucketOptimizer(Backend& be, ProcessGroup& group, std::vector<Bucket> buckets, bool zero1, int timeout_ms,
                  DeviceComms* device)
      : be_(be), group_(group), buckets_(std::move(buckets)), zero1_(zero1), timeout_ms_(timeout_ms), device_(device) {}
  Status Init(std::vector<ModelParams*> params, std::vector<ModelParams*> grads);
  Status ReduceGradientsOnDevice();
  Status GatherWeightsOnDevice();

  Backend& be_;
  ProcessGroup& group_;
  std::vector<Bucket> buckets_;
  bool zero1_;
  int timeout_ms_;
  DeviceComms* device_;
  std::vector<Local> mine_;
  size_t state_bytes_ = 0;
};

}  // namespace troupe::parallel
