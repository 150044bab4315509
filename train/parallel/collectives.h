// Collectives over a ProcessGroup: all-reduce (ring), its two halves for ZeRO-1, all-to-all for expert
// parallelism, barrier and scalar reductions.
//
// Every function takes `group`, the member ranks in order (a subset of the world, e.g. one data-parallel group),
// and every member must call it with the same group, the same `tag` and the same data length; the caller must be
// a member. "Member i" is group[i]. Each collective uses exactly ONE tag, `tag`: messages between two ranks with
// one tag arrive in order, so consecutive collectives may reuse a tag, but collectives that run at the same time
// and share a pair of ranks need different tags. Tags are separate from point-to-point traffic only if the
// caller keeps them apart.
//
// Each receive waits at most timeout_ms, so a dead member is noticed within timeout_ms of its last message; the
// error names the silent rank. After any error the group's message streams are out of step: abort the group
// (ProcessGroup::Abort) and restart from a checkpoint.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "train/parallel/process_group.h"

namespace troupe::parallel {

inline constexpr int kDefaultCollectiveTimeoutMs = 60000;

// The even split of `length` elements into `members` chunks: chunk i holds length / members elements, plus one
// for the first length % members chunks (10 into 3: [0,4), [4,7), [7,10)). Member i owns chunk i after
// ReduceScatterSum (its ZeRO-1 shard).
struct Chunk {
  size_t offset = 0;
  size_t count = 0;
};
Chunk ChunkOf(size_t length, size_t members, size_t index);

// data (len) := the element-wise sum over members, bit-identical on every member: ring reduce-scatter then ring
// all-gather, each chunk summed in one fixed order by one member and then copied to the others. Each member sends
// 2(n-1) chunks of about len/n floats, in messages of at most 4 MiB that pipeline through the ring. A group of
// 1 (or len 0) is a no-op.
Status AllReduceSum(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag,
                    int timeout_ms = kDefaultCollectiveTimeoutMs);

// The first half: afterwards member i's chunk ChunkOf(len, n, i) of data holds the sum over members (the same bits
// AllReduceSum gives); the other chunks hold partial sums (unspecified). n-1 chunks sent per member.
Status ReduceScatterSum(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag,
                        int timeout_ms = kDefaultCollectiveTimeoutMs);

// The second half: on entry member i's chunk ChunkOf(len, n, i) is valid; afterwards every chunk is, on every
// member (copies, so bit-identical). n-1 chunks sent per member.
Status AllGather(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag,
                 int timeout_ms = kDefaultCollectiveTimeoutMs);

// Expert-parallel dispatch/combine: send_per_member[j] goes to member j; the result's [j] is what member j sent to
// this member (this member's own buffer is moved, not sent). Buffers may be empty and of any sizes.
// InvalidArgument unless send_per_member has one entry per member. n-1 messages per member.
Expected<std::vector<std::vector<uint8_t>>> AllToAllV(ProcessGroup& pg, const std::vector<int>& group,
                                                      std::vector<std::vector<uint8_t>> send_per_member, uint64_t tag,
                                                      int timeout_ms = kDefaultCollectiveTimeoutMs);
// AllToAllV in two halves, so the caller computes while the buffers travel: Send queues the other members' buffers
// and returns this member's own one; Recv (same group and tag) waits for the others' and puts `own` in its place.
Expected<std::vector<uint8_t>> AllToAllVSend(ProcessGroup& pg, const std::vector<int>& group,
                                             std::vector<std::vector<uint8_t>> send_per_member, uint64_t tag);
Expected<std::vector<std::vector<uint8_t>>> AllToAllVRecv(ProcessGroup& pg, const std::vector<int>& group,
                                                          std::vector<uint8_t> own, uint64_t tag,
                                                          int timeout_ms = kDefaultCollectiveTimeoutMs);

// Returns once every member has entered (dissemination barrier: ceil(log2 n) rounds of one empty message).
Status Barrier(ProcessGroup& pg, const std::vector<int>& group, uint64_t tag,
               int timeout_ms = kDefaultCollectiveTimeoutMs);

// Max / sum of one double per member (global grad norm, loss). Every member gathers all values and reduces them
// in member order, so the result is bit-identical everywhere; a NaN from any member is the max (a NaN grad norm
// must stop every member's step). n-1 messages per member.
Expected<double> AllReduceMaxScalar(ProcessGroup& pg, const std::vector<int>& group, double value, uint64_t tag,
                                    int timeout_ms = kDefaultCollectiveTimeoutMs);
Expected<double> AllReduceSumScalar(ProcessGroup& pg, const std::vector<int>& group, double value, uint64_t tag,
                                    int timeout_ms = kDefaultCollectiveTimeoutMs);

}  // namespace troupe::parallel
