// Every message tag a distributed job uses, in one place: a kind in the top
// 16 bits and an index below, so traffic of different kinds never shares a
// tag (messages with one (sender, tag) arrive in order; different tags are
// independent).
#pragma once

#include <cstdint>

namespace troupe::parallel {

enum class TagKind : uint64_t {
  kActivation = 1,   // pipeline: a stage's output, index = (micro << 20) | stage
  kGradient = 2,     // pipeline: a stage's input gradient, same index
  kWorld = 8,        // scalar reductions over the world (loss sums, norms, timings)
  kGradBucket = 9,   // BucketOptimizer: gradient reduction, index = bucket
  kLoads = 10,       // routing-bias loads, index = the bias's position
  kBarrier = 11,     // step start, end of the weight gather
  kWeights = 12,     // BucketOptimizer (ZeRO-1): weight all-gather, index = bucket
  kExperts = 13,     // expert all-to-alls, index = phase
  kGather = 14,      // the final weight gather to rank 0
  kOptState = 15,    // checkpoints: AdamW state gathered to each bucket's lowest holder, index = bucket
  kCheckpoint = 16,  // checkpoints: ids, manifests and written pieces between the ranks and rank 0 (dist_checkpoint)
  kDeviceComm = 17,  // NCCL ids from each device group's lowest rank to the others, index = the group's position
  kJobCheck = 18,    // each rank's job fingerprint to every other, at start
};

// kCheckpoint's indices (train/parallel/dist_checkpoint.h).
enum CheckpointMessage : uint64_t { kCkptOrder = 1, kCkptReport = 2, kCkptResume = 3, kCkptReplica = 4 };

inline uint64_t Tag(TagKind kind, uint64_t index = 0) { return (static_cast<uint64_t>(kind) << 48) | index; }

// A pipeline transfer's tag: micro-batch and stage in the index.
inline uint64_t ChunkTag(TagKind kind, int micro, int stage) {
  return Tag(kind, (static_cast<uint64_t>(micro) << 20) | static_cast<uint64_t>(stage));
}

}  // namespace troupe::parallel
