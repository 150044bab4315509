// Ring all-reduce, its halves, all-to-all, barrier and scalar reductions over a ProcessGroup.
//
// Ring notation: n members, member i sends to next = member (i+1) % n and receives from prev = member (i-1) % n.
//
//   reduce-scatter, step s = 0..n-2:  send chunk (i-s-1) % n, receive chunk (i-s-2) % n and add it in
//                                     → after n-1 steps member i holds the full sum of chunk i
//   all-gather,     step s = 0..n-2:  send chunk (i-s) % n, receive chunk (i-s-1) % n and copy it
//
// The chunk a step receives is the one the next step sends, so each received segment is summed (or copied) and
// sent straight on in the same buffer: segments pipeline through the ring instead of waiting for whole chunks.
//
// Chunk c is summed along the ring starting at member c+1: x[c+1] + x[c+2] + ... + x[c], one fixed order computed
// by one member, then copied; that is why every member ends with the same bits.
#include "train/parallel/collectives.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <string>

namespace troupe::parallel {
namespace {

// Chunks travel in segments of this many floats (4 MiB), each its own message, so the ring pipelines: a member
// forwards segment k while segment k+1 is still being encrypted, sent and decrypted upstream. Measured on a
// loaded 2-core box (4 processes, 16 MiB): 512 KiB and 128 KiB segments were 1.5x slower than whole 4 MiB chunks,
// since there the cores, not the pipeline's latency, are the limit; 4 MiB keeps per-message costs small and
// still pipelines the big gradient buckets.
constexpr size_t kSegmentFloats = size_t{1} << 20;

// This rank's position in `group`, after checking the group is usable.
Expected<size_t> MemberIndex(const ProcessGroup& pg, const std::vector<int>& group, const char* what) {
  if (group.empty()) return Status::InvalidArgument(std::string(what) + ": empty group");
  std::set<int> seen;
  for (int r : group) {
    if (r < 0 || r >= pg.size()) {
      return Status::InvalidArgument(std::string(what) + ": rank " + std::to_string(r) + " is not in a world of " +
                                     std::to_string(pg.size()));
    }
    if (!seen.insert(r).second) {
      return Status::InvalidArgument(std::string(what) + ": rank " + std::to_string(r) + " is listed twice");
    }
  }
  auto it = std::find(group.begin(), group.end(), pg.rank());
  if (it == group.end()) {
    return Status::InvalidArgument(std::string(what) + ": rank " + std::to_string(pg.rank()) +
                                   " is not a member of its group");
  }
  return static_cast<size_t>(it - group.begin());
}

std::vector<uint8_t> ToBytes(std::span<const float> values) {
  std::vector<uint8_t> out;
  out.reserve(values.size_bytes() + kSendReserveBytes);
  out.resize(values.size_bytes());
  if (!values.empty()) std::memcpy(out.data(), values.data(), values.size_bytes());
  return out;
}

// The ring's context for one call.
struct Ring {
  ProcessGroup& pg;
  const std::vector<int>& group;
  size_t me, n;
  uint64_t tag;
  int timeout_ms;
  const char* what;
  std::span<float> data;  // (len)

  int next() const { return group[(me + 1) % n]; }
  int prev() const { return group[(me + n - 1) % n]; }
  Chunk ChunkAt(size_t minus) const { return ChunkOf(data.size(), n, (me + 2 * n - minus) % n); }  // (me-minus)%n

  Status SendChunk(Chunk c) const {
    for (size_t o = 0; o < c.count; o += kSegmentFloats) {
      const size_t m = std::min(kSegmentFloats, c.count - o);
      TROUPE_RETURN_IF_ERROR(pg.Send(next(), tag, ToBytes(data.subspan(c.offset + o, m))));
    }
    return Status::Ok();
  }

  // Receives the segment [offset, offset + count) from prev, checking it is exactly that size.
  Expected<std::vector<uint8_t>> RecvSegment(size_t offset, size_t count) const {
    TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, pg.Recv(prev(), tag, timeout_ms));
    if (bytes.size() != count * sizeof(float)) {
      return Status::Corruption(
          std::string(what) + ": rank " + std::to_string(prev()) + " sent " + std::to_string(bytes.size()) +
          " bytes for elements [" + std::to_string(offset) + ", " + std::to_string(offset + count) + "), expected " +
          std::to_string(count * sizeof(float)) + " (do all members pass the same length and group?)");
    }
    return bytes;
  }
};

// Reduce-scatter. With forward_last, the last step also sends each finished segment of chunk me on: that is
// all-gather's first step, started while the rest of the chunk is still being summed.
Status RingReduceScatter(const Ring& ring, bool forward_last) {
  TROUPE_RETURN_IF_ERROR(ring.SendChunk(ring.ChunkAt(1)));  // step 0's send
  for (size_t s = 0; s + 1 < ring.n; ++s) {
    const Chunk in = ring.ChunkAt(s + 2);
    const bool forward = s + 2 < ring.n || forward_last;  // what we receive now is what step s+1 sends
    for (size_t o = 0; o < in.count; o += kSegmentFloats) {
      const size_t m = std::min(kSegmentFloats, in.count - o);
      TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ring.RecvSegment(in.offset + o, m));
      float* dst = ring.data.data() + in.offset + o;  // (m)
      for (size_t k = 0; k < m; ++k) {
        float v;  // bytes carry no float alignment promise: memcpy, which compiles to plain loads
        std::memcpy(&v, bytes.data() + k * sizeof(float), sizeof(float));
        dst[k] += v;
        std::memcpy(bytes.data() + k * sizeof(float), &dst[k], sizeof(float));  // the buffer goes on, reused
      }
      if (forward) TROUPE_RETURN_IF_ERROR(ring.pg.Send(ring.next(), ring.tag, std::move(bytes)));
    }
  }
  return Status::Ok();
}

// All-gather; without send_first, step 0's send was done by RingReduceScatter(forward_last).
Status RingAllGather(const Ring& ring, bool send_first) {
  if (send_first) TROUPE_RETURN_IF_ERROR(ring.SendChunk(ring.ChunkAt(0)));
  for (size_t s = 0; s + 1 < ring.n; ++s) {
    const Chunk in = ring.ChunkAt(s + 1);
    const bool forward = s + 2 < ring.n;
    for (size_t o = 0; o < in.count; o += kSegmentFloats) {
      const size_t m = std::min(kSegmentFloats, in.count - o);
      TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ring.RecvSegment(in.offset + o, m));
      std::memcpy(ring.data.data() + in.offset + o, bytes.data(), bytes.size());
      if (forward) TROUPE_RETURN_IF_ERROR(ring.pg.Send(ring.next(), ring.tag, std::move(bytes)));
    }
  }
  return Status::Ok();
}

// Runs `body` on the ring unless there is nothing to do (one member, or no data: every member agrees on both).
template <typename Body>
Status OnRing(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag, int timeout_ms,
              const char* what, Body body) {
  TROUPE_ASSIGN_OR_RETURN(const size_t me, MemberIndex(pg, group, what));
  if (group.size() == 1 || data.empty()) return Status::Ok();
  return body(Ring{pg, group, me, group.size(), tag, timeout_ms, what, data});
}

// Every member's `value`, in member order.
Expected<std::vector<double>> GatherScalars(ProcessGroup& pg, const std::vector<int>& group, double value, uint64_t tag,
                                            int timeout_ms) {
  std::vector<uint8_t> bytes(sizeof(double));
  std::memcpy(bytes.data(), &value, sizeof(double));
  std::vector<std::vector<uint8_t>> send(group.size(), bytes);
  TROUPE_ASSIGN_OR_RETURN(auto got, AllToAllV(pg, group, std::move(send), tag, timeout_ms));
  std::vector<double> out(got.size());
  for (size_t j = 0; j < got.size(); ++j) {
    if (got[j].size() != sizeof(double)) {
      return Status::Corruption("AllReduceScalar: rank " + std::to_string(group[j]) + " sent " +
                                std::to_string(got[j].size()) + " bytes, expected 8");
    }
    std::memcpy(&out[j], got[j].data(), sizeof(double));
  }
  return out;
}

}  // namespace

Chunk ChunkOf(size_t length, size_t members, size_t index) {
  const size_t base = length / members, extra = length % members;
  return {index * base + std::min(index, extra), base + (index < extra ? 1 : 0)};
}

Status AllReduceSum(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag,
                    int timeout_ms) {
  return OnRing(pg, group, data, tag, timeout_ms, "AllReduceSum", [&](const Ring& ring) {
    TROUPE_RETURN_IF_ERROR(RingReduceScatter(ring, /*forward_last=*/true));
    return RingAllGather(ring, /*send_first=*/false);
  });
}

Status ReduceScatterSum(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag,
                        int timeout_ms) {
  return OnRing(pg, group, data, tag, timeout_ms, "ReduceScatterSum",
                [](const Ring& ring) { return RingReduceScatter(ring, /*forward_last=*/false); });
}

Status AllGather(ProcessGroup& pg, const std::vector<int>& group, std::span<float> data, uint64_t tag, int timeout_ms) {
  return OnRing(pg, group, data, tag, timeout_ms, "AllGather",
                [](const Ring& ring) { return RingAllGather(ring, /*send_first=*/true); });
}

Expected<std::vector<uint8_t>> AllToAllVSend(ProcessGroup& pg, const std::vector<int>& group,
                                             std::vector<std::vector<uint8_t>> send_per_member, uint64_t tag) {
  TROUPE_ASSIGN_OR_RETURN(const size_t me, MemberIndex(pg, group, "AllToAllV"));
  const size_t n = group.size();
  if (send_per_member.size() != n) {
    return Status::InvalidArgument("AllToAllV: " + std::to_string(send_per_member.size()) + " buffers for a group of " +
                                   std::to_string(n));
  }
  // Send everything first (Send only queues), then collect: no member waits on another's receive order.
  for (size_t k = 1; k < n; ++k) {
    const size_t j = (me + k) % n;  // start with the next member so the ranks do not all send to member 0 first
    TROUPE_RETURN_IF_ERROR(pg.Send(group[j], tag, std::move(send_per_member[j])));
  }
  return std::move(send_per_member[me]);
}

Expected<std::vector<std::vector<uint8_t>>> AllToAllVRecv(ProcessGroup& pg, const std::vector<int>& group,
                                                          std::vector<uint8_t> own, uint64_t tag, int timeout_ms) {
  TROUPE_ASSIGN_OR_RETURN(const size_t me, MemberIndex(pg, group, "AllToAllV"));
  const size_t n = group.size();
  std::vector<std::vector<uint8_t>> got(n);
  got[me] = std::move(own);
  for (size_t k = 1; k < n; ++k) {
    const size_t j = (me + n - k) % n;
    TROUPE_ASSIGN_OR_RETURN(got[j], pg.Recv(group[j], tag, timeout_ms));
  }
  return got;
}

Expected<std::vector<std::vector<uint8_t>>> AllToAllV(ProcessGroup& pg, const std::vector<int>& group,
                                                      std::vector<std::vector<uint8_t>> send_per_member, uint64_t tag,
                                                      int timeout_ms) {
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> own, AllToAllVSend(pg, group, std::move(send_per_member), tag));
  return AllToAllVRecv(pg, group, std::move(own), tag, timeout_ms);
}

Status Barrier(ProcessGroup& pg, const std::vector<int>& group, uint64_t tag, int timeout_ms) {
  TROUPE_ASSIGN_OR_RETURN(const size_t me, MemberIndex(pg, group, "Barrier"));
  const size_t n = group.size();
  // Round d: tell member me+d, hear from member me-d. After the round with d >= n/2 every member has (transitively)
  // heard from every other.
  for (size_t d = 1; d < n; d *= 2) {
    TROUPE_RETURN_IF_ERROR(pg.Send(group[(me + d) % n], tag, {}));
    TROUPE_RETURN_IF_ERROR(pg.Recv(group[(me + n - d) % n], tag, timeout_ms).status());
  }
  return Status::Ok();
}

Expected<double> AllReduceMaxScalar(ProcessGroup& pg, const std::vector<int>& group, double value, uint64_t tag,
                                    int timeout_ms) {
  TROUPE_ASSIGN_OR_RETURN(const std::vector<double> all, GatherScalars(pg, group, value, tag, timeout_ms));
  // A NaN anywhere must win (a NaN grad norm means "skip this step"); std::max would drop it depending on order.
  for (double v : all) {
    if (std::isnan(v)) return v;
  }
  return *std::max_element(all.begin(), all.end());
}

Expected<double> AllReduceSumScalar(ProcessGroup& pg, const std::vector<int>& group, double value, uint64_t tag,
                                    int timeout_ms) {
  TROUPE_ASSIGN_OR_RETURN(const std::vector<double> all, GatherScalars(pg, group, value, tag, timeout_ms));
  double sum = 0;
  for (double v : all) sum += v;  // member order: the same bits on every member
  return sum;
}

}  // namespace troupe::parallel
