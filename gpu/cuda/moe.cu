// Mixture-of-experts kernels of the CUDA backend (BRIEF §1, MoE). The CPU
// reference is gpu/cpu/moe.cpp; every kernel here reproduces its selection
// and its orders:
//   MoeRoute / MoeRouteBackward       one warp per token: group scores, group
//                                     limit, top K by (s + b), gates from s
//   MoeExpertLoad                     histogram (integer atomics only)
//   MoePermute / MoePermuteBackward   stable counting sort, entirely on device
//   MoeCombine / MoeCombineBackward   gated gather-sum back to tokens
//   MoeBalanceLoss / ...Backward      sequence-wise balance loss, one block per
//                                     sequence
//
// Exactness. Selection values (s + b) and group scores are F32 sums in the
// reference's order (largest first, from 0), so the same experts are picked
// bit for bit; gates are computed in double in ascending expert order exactly
// as the reference does, so they match to the last bit as well. topk_idx,
// offsets and slot are integers produced without any order-dependent step.
//
// Determinism. No float atomics anywhere: every float output is owned by one
// thread (or one warp with a fixed shuffle tree, or one block with a fixed
// reduction order). Integer atomics only build histograms whose values do not
// depend on the order of the increments.
//
// The stable sort (MoePermute), over the flat assignment order i = n*K + k:
//   1. ChunkCounts   [chunks, E]  per chunk of C assignments, a histogram;
//   2. ScanCounts    one block: per expert, exclusive scan over chunks (in
//                    place), expert totals, exclusive scan over experts ->
//                    offsets [E+1];
//   3. RankScatter   per chunk, W warps each own C/W consecutive assignments;
//                    __match_any_sync gives the rank among equal experts of one
//                    32-wide step, a per-warp running counter carries it across
//                    steps, a per-expert scan over the W warps joins them:
//                    slot = offsets[e] + chunk base + warp base + rank;
//   4. PermuteRows   one warp per token copies its row to its K slots.
// Expert ids outside [0, E) (a broken precondition) are ignored: counted
// nowhere, slot -1, and the gather kernels skip slot < 0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_util.cuh"

namespace troupe {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarp = 32;
constexpr size_t kSmemLimit = 48 * 1024;  // per-block shared memory without the opt-in
constexpr int kMaxExperts = 8192;         // histograms and the sort keep (E) ints in shared memory

using cuda_util::Blocks;
using cuda_util::CeilDiv;
using cuda_util::Check;
using cuda_util::CudaOk;
using cuda_util::LaunchOk;
using cuda_util::WarpSumDouble;

std::string Shape(const Tensor& t) { return t.name() + t.ShapeString(); }

// Host-side argument checks; Fail and return false on the first problem.
bool IsF32(CudaBackend& be, const char* op, const Tensor& t) {
  if (t.dtype() == DType::kF32 && t.device() == DeviceKind::kCuda) return true;
  be.Fail(op, "tensor " + Shape(t) + " must be an F32 CUDA tensor, is " + DTypeName(t.dtype()) +
                  (t.device() == DeviceKind::kCuda ? "" : " on the host"));
  return false;
}

bool IsI32(CudaBackend& be, const char* op, const Tensor& t) {
  if (t.dtype() == DType::kI32 && t.device() == DeviceKind::kCuda) return true;
  be.Fail(op, "tensor " + Shape(t) + " must be an I32 CUDA tensor, is " + DTypeName(t.dtype()) +
                  (t.device() == DeviceKind::kCuda ? "" : " on the host"));
  return false;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- device helpers ------------------------------------------------------------

// Row vectors of V floats (V = 4 when rows are 16-byte aligned and D % 4 == 0).
template <int V>
__device__ __forceinline__ void LoadV(float (&r)[V], const float* p) {
  if constexpr (V == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    r[0] = t.x, r[1] = t.y, r[2] = t.z, r[3] = t.w;
  } else {
    r[0] = *p;
  }
}

template <int V>
__device__ __forceinline__ void StoreV(float* p, const float (&r)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
  } else {
    *p = r[0];
  }
}

// (value, index) of the better of two candidates: larger value, ties to the
// lower index; index -1 is "none". A total order, so the warp butterfly gives
// the same winner in every lane.
__device__ __forceinline__ void Better(float& v, int& i, float ov, int oi) {
  if (oi < 0) return;
  if (i < 0 || ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

// Padded shared-memory index: lanes scanning different groups of 32 experts
// hit different banks.
__device__ __forceinline__ int Pad(int e) { return e + (e >> 5); }

// ---- MoeRoute ------------------------------------------------------------------

constexpr int kRouteWarps = 4;

// One warp per token. Shared memory per warp: sel (E, padded) then 32 ints.
// topk_idx (N, K), topk_gate (N, K), scores (N, E), bias (E).
__global__ void RouteKernel(int32_t* __restrict__ topk_idx, float* __restrict__ topk_gate,
                            const float* __restrict__ scores, const float* __restrict__ bias, int64_t N, int E, int K,
                            int G, int M, double scale, bool normalize) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int sel_len = Pad(E - 1) + 1;
  float* sel = smem + warp * (sel_len + kWarp);
  int* picks = reinterpret_cast<int*>(sel + sel_len);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (n >= N) return;  // whole warp leaves together
  const float* s = scores + n * E;
  for (int e = lane; e < E; e += kWarp) sel[Pad(e)] = s[e] + bias[e];  // F32 add, as the reference
  __syncwarp();

  // 1. Groups (only when the limit can bind): lane g scores group g as the sum,
  //    largest first from 0 in F32, of its top per_group selection values
  //    (ties to the lower id; the sum of equal values is order-free anyway).
  //    Then group g is kept when its rank by (score desc, index asc) is < M.
  const int group_size = E / G;
  unsigned kept = kFull;
  if (M < G) {
    const int per_group = min(group_size, max(1, K / M));
    float score = 0.0f;
    if (lane < G) {
      const int begin = lane * group_size, end = begin + group_size;
      float last_v = 0.0f;
      int last_i = -1;  // the previous pick; the next is the best strictly after it
      for (int r = 0; r < per_group; ++r) {
        float bv = 0.0f;
        int bi = -1;
        for (int e = begin; e < end; ++e) {
          const float v = sel[Pad(e)];
          const bool after = last_i < 0 || v < last_v || (v == last_v && e > last_i);
          if (after && (bi < 0 || v > bv)) bv = v, bi = e;
        }
        score += bv;
        last_v = bv, last_i = bi;
      }
    }
    int rank = 0;
    for (int h = 0; h < G; ++h) {
      const float other = __shfl_sync(kFull, score, h);
      rank += other > score || (other == score && h < lane);
    }
    kept = __ballot_sync(kFull, lane < G && rank < M);
  }

  // 2. Top K among experts of kept groups: K rounds of a warp arg-max over the
  //    experts strictly after the previous pick in (value desc, id asc) order.
  //    Lane k keeps the k-th pick.
  int my_pick = -1;
  float last_v = 0.0f;
  int last_i = -1;
  for (int k = 0; k < K; ++k) {
    float bv = 0.0f;
    int bi = -1;
    for (int e = lane; e < E; e += kWarp) {
      if (!((kept >> (e / group_size)) & 1u)) continue;
      const float v = sel[Pad(e)];
      const bool after = last_i < 0 || v < last_v || (v == last_v && e > last_i);
      if (after && (bi < 0 || v > bv)) bv = v, bi = e;  // ascending e: ties keep the lower id
    }
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      Better(bv, bi, ov, oi);
    }
    last_v = bv, last_i = bi;
    if (lane == k) my_pick = bi;
  }

  // 3. Emit ascending by expert id; gates from s only, denominators summed in
  //    double in ascending id order, exactly as the reference.
  int pos = 0;
  for (int j = 0; j < K; ++j) {
    const int other = __shfl_sync(kFull, my_pick, j);
    pos += other < my_pick || (other == my_pick && j < lane);  // distinct ids; lane order only guards -1
  }
  if (lane < K) picks[pos] = my_pick;
  __syncwarp();
  if (lane < K) {
    double denom = 0.0;
    // A pick of -1 only comes from NaN selection values (a broken input).
    for (int j = 0; j < K; ++j) denom += picks[j] >= 0 ? static_cast<double>(s[picks[j]]) : 0.0;
    const double sj = my_pick >= 0 ? static_cast<double>(s[my_pick]) : __longlong_as_double(0x7ff8000000000000LL);
    topk_idx[n * K + pos] = my_pick;
    topk_gate[n * K + pos] = static_cast<float>(normalize ? scale * sj / denom : scale * sj);
  }
}

// One thread per token; the reference's double arithmetic, in its order.
// dscores (N, E) +=, dgate (N, K), scores (N, E), topk_idx (N, K).
__global__ void RouteBackwardKernel(float* __restrict__ dscores, const float* __restrict__ dgate,
                                    const float* __restrict__ scores, const int32_t* __restrict__ topk_idx, int64_t N,
                                    int E, int K, double scale, bool normalize) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int32_t* row = topk_idx + n * K;
  const float* sn = scores + n * E;
  const float* dgn = dgate + n * K;
  float* dsn = dscores + n * E;
  if (!normalize) {
    for (int k = 0; k < K; ++k) {
      const int e = row[k];
      if (e < 0 || e >= E) continue;
      dsn[e] = static_cast<float>(dsn[e] + scale * dgn[k]);
    }
    return;
  }
  double denom = 0.0, dot = 0.0;
  for (int k = 0; k < K; ++k) {
    const int e = row[k];
    if (e < 0 || e >= E) continue;
    denom += static_cast<double>(sn[e]);
    dot += static_cast<double>(dgn[k]) * static_cast<double>(sn[e]);
  }
  for (int k = 0; k < K; ++k) {
    const int e = row[k];
    if (e < 0 || e >= E) continue;
    const double g = scale * (static_cast<double>(dgn[k]) / denom - dot / (denom * denom));
    dsn[e] = static_cast<float>(dsn[e] + g);
  }
}

// ---- histograms and the stable sort ----------------------------------------------

constexpr int kHistThreads = 256;
constexpr int kRankSub = 256;                 // assignments per warp in RankScatter
constexpr int kRankSteps = kRankSub / kWarp;  // 32-wide steps per warp
constexpr int kMaxRankWarps = 8;
constexpr int kScanThreads = 1024;

// Histogram of the chunk [c*chunk, (c+1)*chunk) of idx, in shared memory.
// table (chunks, E) gets the chunk's counts when non-null; total (E) gets them
// added with integer atomics when non-null.
__global__ void ChunkCountsKernel(int32_t* __restrict__ table, int32_t* __restrict__ total,
                                  const int32_t* __restrict__ idx, int64_t count, int E, int chunk) {
  extern __shared__ int hist[];  // (E)
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(begin + chunk, count);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int e = idx[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (table) table[static_cast<int64_t>(blockIdx.x) * E + e] = hist[e];
    if (total && hist[e] != 0) atomicAdd(&total[e], hist[e]);
  }
}

// Exclusive scan of one int per thread over the block (blockDim a multiple of
// 32, at most 1024). `warp_sums` is 32 ints of shared memory; *block_total
// receives the sum. Ends with a __syncthreads.
__device__ int BlockExclusiveScan(int v, int* warp_sums, int* block_total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  int incl = v;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == kWarp - 1) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < n_warps ? warp_sums[lane] : 0;
    int wincl = w;
    for (int o = 1; o < kWarp; o <<= 1) {
      const int t = __shfl_up_sync(kFull, wincl, o);
      if (lane >= o) wincl += t;
    }
    if (lane < n_warps) warp_sums[lane] = wincl - w;  // exclusive prefix of the warps
    if (lane == kWarp - 1) *block_total = wincl;
  }
  __syncthreads();
  const int result = warp_sums[warp] + incl - v;
  __syncthreads();
  return result;
}

// One block. table (chunks, E): counts in, exclusive per-expert prefix over
// chunks out. offsets (E + 1): exclusive scan of the expert totals.
__global__ void ScanCountsKernel(int32_t* __restrict__ table, int32_t* __restrict__ offsets, int chunks, int E) {
  extern __shared__ int totals[];  // (E)
  __shared__ int warp_sums[kWarp];
  __shared__ int grand_total;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int c = 0; c < chunks; ++c) {
      int32_t* p = table + static_cast<int64_t>(c) * E + e;
      const int t = *p;
      *p = run;
      run += t;
    }
    totals[e] = run;
  }
  __syncthreads();
  // Thread t scans the contiguous segment [t*seg, (t+1)*seg) of the totals.
  const int seg = (E + blockDim.x - 1) / blockDim.x;
  const int begin = min(E, static_cast<int>(threadIdx.x) * seg), end = min(E, begin + seg);
  int local = 0;
  for (int e = begin; e < end; ++e) local += totals[e];
  int run = BlockExclusiveScan(local, warp_sums, &grand_total);
  for (int e = begin; e < end; ++e) {
    offsets[e] = run;
    run += totals[e];
  }
  if (threadIdx.x == 0) offsets[E] = grand_total;
}

// Per chunk of n_warps * kRankSub assignments (see the file comment, step 3).
// slot (count) out; idx (count); table (chunks, E) per-chunk exclusive bases;
// offsets (E + 1).
__global__ void RankScatterKernel(int32_t* __restrict__ slot, const int32_t* __restrict__ idx,
                                  const int32_t* __restrict__ table, const int32_t* __restrict__ offsets, int64_t count,
                                  int E) {
  extern __shared__ int cnt[];  // (n_warps, E): running counts, then bases
  const int n_warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int i = threadIdx.x; i < n_warps * E; i += blockDim.x) cnt[i] = 0;
  __syncthreads();
  const unsigned lanes_before = (1u << lane) - 1u;
  int* my_cnt = cnt + warp * E;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n_warps * kRankSub + static_cast<int64_t>(warp) * kRankSub;
  int key[kRankSteps], rank[kRankSteps];
#pragma unroll
  for (int step = 0; step < kRankSteps; ++step) {
    const int64_t i = base + step * kWarp + lane;
    int e = i < count ? idx[i] : -1;
    if (e < 0 || e >= E) e = -1;
    const unsigned peers = __match_any_sync(kFull, e);
    int r = 0;
    if (e >= 0) r = my_cnt[e] + __popc(peers & lanes_before);
    __syncwarp();  // every peer has read the counter before the leader bumps it
    if (e >= 0 && (peers & lanes_before) == 0) my_cnt[e] += __popc(peers);
    __syncwarp();
    key[step] = e;
    rank[step] = r;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = offsets[e] + table[static_cast<int64_t>(blockIdx.x) * E + e];
    for (int w = 0; w < n_warps; ++w) {
      const int t = cnt[w * E + e];
      cnt[w * E + e] = run;
      run += t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int step = 0; step < kRankSteps; ++step) {
    const int64_t i = base + step * kWarp + lane;
    if (i < count) slot[i] = key[step] >= 0 ? my_cnt[key[step]] + rank[step] : -1;
  }
}

// ---- row movers: one warp per token ----------------------------------------------

constexpr int kRowWarps = 8;

// x_sorted (N*K, D) rows slot[n, k] = x[n].
template <int V>
__global__ void PermuteRowsKernel(float* __restrict__ x_sorted, const float* __restrict__ x,
                                  const int32_t* __restrict__ slot, int64_t N, int K, int64_t D) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const float* src = x + n * D;
  for (int64_t c = static_cast<int64_t>(lane) * V; c < D; c += kWarp * V) {
    float v[V];
    LoadV<V>(v, src + c);
    for (int k = 0; k < K; ++k) {
      const int r = slot[n * K + k];
      if (r >= 0) StoreV<V>(x_sorted + static_cast<int64_t>(r) * D + c, v);
    }
  }
}

// dx[n] += sum_k dx_sorted[slot[n, k]], summed in k order per element.
template <int V>
__global__ void PermuteBackwardKernel(float* __restrict__ dx, const float* __restrict__ dx_sorted,
                                      const int32_t* __restrict__ slot, int64_t N, int K, int64_t D) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  float* dst = dx + n * D;
  for (int64_t c = static_cast<int64_t>(lane) * V; c < D; c += kWarp * V) {
    float acc[V];
    LoadV<V>(acc, dst + c);
    for (int k = 0; k < K; ++k) {
      const int r = slot[n * K + k];
      if (r < 0) continue;
      float v[V];
      LoadV<V>(v, dx_sorted + static_cast<int64_t>(r) * D + c);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += v[j];
    }
    StoreV<V>(dst + c, acc);
  }
}

// y[n] += sum_k gate[n, k] * y_sorted[slot[n, k]], in k order, one fma each.
template <int V>
__global__ void CombineKernel(float* __restrict__ y, const float* __restrict__ y_sorted, const float* __restrict__ gate,
                              const int32_t* __restrict__ slot, int64_t N, int K, int64_t D) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  float* dst = y + n * D;
  for (int64_t c = static_cast<int64_t>(lane) * V; c < D; c += kWarp * V) {
    float acc[V];
    LoadV<V>(acc, dst + c);
    for (int k = 0; k < K; ++k) {
      const int r = slot[n * K + k];
      if (r < 0) continue;
      const float g = gate[n * K + k];
      float v[V];
      LoadV<V>(v, y_sorted + static_cast<int64_t>(r) * D + c);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = fmaf(g, v[j], acc[j]);
    }
    StoreV<V>(dst + c, acc);
  }
}

// dy_sorted[slot[n, k]] = gate[n, k] * dy[n] (overwritten);
// dgate[n, k] = dy[n] . y_sorted[slot[n, k]] in double (fixed lane order +
// butterfly), rounded once.
template <int V>
__global__ void CombineBackwardKernel(float* __restrict__ dy_sorted, float* __restrict__ dgate,
                                      const float* __restrict__ dy, const float* __restrict__ y_sorted,
                                      const float* __restrict__ gate, const int32_t* __restrict__ slot, int64_t N,
                                      int K, int64_t D) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const float* dn = dy + n * D;
  for (int k = 0; k < K; ++k) {
    const int r = slot[n * K + k];
    if (r < 0) {
      if (lane == 0) dgate[n * K + k] = 0.0f;
      continue;
    }
    const float g = gate[n * K + k];
    const float* yr = y_sorted + static_cast<int64_t>(r) * D;
    float* dr = dy_sorted + static_cast<int64_t>(r) * D;
    double dot = 0.0;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < D; c += kWarp * V) {
      float d[V], yv[V], out[V];
      LoadV<V>(d, dn + c);
      LoadV<V>(yv, yr + c);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        out[j] = g * d[j];
        dot += static_cast<double>(d[j]) * static_cast<double>(yv[j]);
      }
      StoreV<V>(dr + c, out);
    }
    dot = WarpSumDouble(dot);
    if (lane == 0) dgate[n * K + k] = static_cast<float>(dot);
  }
}

// ---- balance loss ---------------------------------------------------------------

constexpr int kMaxLossWarps = 16;

// Adds, for the tokens [t0, t0 + T) of topk_idx, one per distinct expert of
// each token row (the reference's FirstOccurrence) into shared `cnt` (E).
__device__ void CountSequence(int* cnt, const int32_t* __restrict__ topk_idx, int64_t t0, int T, int K, int E) {
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const int32_t* row = topk_idx + (t0 + t) * K;
    for (int k = 0; k < K; ++k) {
      const int e = row[k];
      if (e < 0 || e >= E) continue;
      bool first = true;
      for (int j = 0; j < k; ++j) first = first && row[j] != e;
      if (first) atomicAdd(&cnt[e], 1);
    }
  }
}

// counts (B, E) per sequence; one block per sequence.
__global__ void SequenceCountsKernel(int32_t* __restrict__ counts, const int32_t* __restrict__ topk_idx, int T, int K,
                                     int E) {
  extern __shared__ int cnt[];  // (E)
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  CountSequence(cnt, topk_idx, static_cast<int64_t>(blockIdx.x) * T, T, K, E);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[static_cast<int64_t>(blockIdx.x) * E + e] = cnt[e];
}

// loss (B): one block of n_warps warps per sequence. Warp w takes tokens
// w, w + n_warps, ...: S_t by a double butterfly, then p_w[e] += s_et / S_t;
// the warp partials are summed in warp order, the loss terms in a fixed tree.
// Shared: p (n_warps, E) doubles, then cnt (E) ints.
__global__ void BalanceLossKernel(float* __restrict__ loss, const float* __restrict__ scores,
                                  const int32_t* __restrict__ topk_idx, int T, int K, int E, double f_scale,
                                  double alpha) {
  extern __shared__ double p[];
  const int n_warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int* cnt = reinterpret_cast<int*>(p + n_warps * E);
  for (int i = threadIdx.x; i < n_warps * E; i += blockDim.x) p[i] = 0.0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * T;
  CountSequence(cnt, topk_idx, t0, T, K, E);
  double* pw = p + warp * E;
  for (int t = warp; t < T; t += n_warps) {
    const float* sn = scores + (t0 + t) * E;
    double denom = 0.0;
    for (int e = lane; e < E; e += kWarp) denom += static_cast<double>(sn[e]);
    denom = WarpSumDouble(denom);
    for (int e = lane; e < E; e += kWarp) pw[e] += static_cast<double>(sn[e]) / denom;
  }
  __syncthreads();
  // Term of expert e into p[0][e] (each thread touches only its own columns).
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double pe = 0.0;
    for (int w = 0; w < n_warps; ++w) pe += p[w * E + e];
    p[e] = (f_scale * cnt[e]) * (pe / static_cast<double>(T));
  }
  __syncthreads();
  if (warp == 0) {
    double sum = 0.0;
    for (int e = lane; e < E; e += kWarp) sum += p[e];
    sum = WarpSumDouble(sum);
    if (lane == 0) loss[blockIdx.x] = static_cast<float>(alpha * sum);
  }
}

// dscores[n, j] += coef (c_j - r_n) / S_n, r_n = sum_i c_i s_in / S_n; one warp
// per token. counts (B, E) from SequenceCountsKernel.
__global__ void BalanceLossBackwardKernel(float* __restrict__ dscores, const float* __restrict__ scores,
                                          const int32_t* __restrict__ counts, int64_t N, int T, int E, double coef) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const float* sn = scores + n * E;
  float* dsn = dscores + n * E;
  const int32_t* c = counts + (n / T) * E;
  double denom = 0.0, weighted = 0.0;
  for (int e = lane; e < E; e += kWarp) {
    const double s = static_cast<double>(sn[e]);
    denom += s;
    weighted += c[e] * s;
  }
  denom = WarpSumDouble(denom);
  weighted = WarpSumDouble(weighted);
  const double r = weighted / denom;
  for (int e = lane; e < E; e += kWarp) dsn[e] = static_cast<float>(dsn[e] + coef * (c[e] - r) / denom);
}

}  // namespace

// ---- routing ---------------------------------------------------------------------

void CudaBackend::MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias,
                           const RoutingSpec& spec) {
  constexpr const char* kOp = "MoeRoute";
  if (failed()) return;
  if (!IsI32(*this, kOp, topk_idx) || !IsF32(*this, kOp, topk_gate) || !IsF32(*this, kOp, scores) ||
      !IsF32(*this, kOp, bias)) {
    return;
  }
  const int64_t N = scores.rows(), E = scores.cols();
  const int K = spec.top_k, G = spec.n_group, M = spec.topk_group;
  const std::string spec_str =
      "E=" + std::to_string(E) + " K=" + std::to_string(K) + " G=" + std::to_string(G) + " M=" + std::to_string(M);
  if (!Check(*this, kOp, bias.numel() == E, "bias " + Shape(bias) + " must hold E=" + std::to_string(E)) ||
      !Check(*this, kOp, topk_idx.rows() == N && topk_idx.cols() == K && topk_gate.rows() == N && topk_gate.cols() == K,
             "topk_idx " + Shape(topk_idx) + " and topk_gate " + Shape(topk_gate) + " must be [N, K] for scores " +
                 Shape(scores) + ", K=" + std::to_string(K)) ||
      !Check(*this, kOp, E >= 1 && E <= 2048, "needs 1 <= E <= 2048, " + spec_str) ||
      !Check(*this, kOp, K >= 1 && K <= kWarp, "needs 1 <= K <= 32, " + spec_str) ||
      !Check(*this, kOp, G >= 1 && G <= kWarp && E % G == 0, "needs 1 <= G <= 32 dividing E, " + spec_str) ||
      !Check(*this, kOp, M >= 1 && M <= G && K <= M * (E / G),
             "needs 1 <= M <= G and K <= M * E/G (enough allowed experts), " + spec_str)) {
    return;
  }
  if (N == 0) return;
  const int sel_len = static_cast<int>(E - 1 + (E - 1) / 32 + 1);
  const size_t smem = static_cast<size_t>(kRouteWarps) * (sel_len + kWarp) * sizeof(float);
  RouteKernel<<<Blocks(N, kRouteWarps), kRouteWarps * kWarp, smem, stream()>>>(
      topk_idx.data<int32_t>(), topk_gate.data<float>(), scores.data<float>(), bias.data<float>(), N,
      static_cast<int>(E), K, G, M, spec.scale, spec.normalize);
  LaunchOk(*this, kOp);
}

void CudaBackend::MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx,
                                   const RoutingSpec& spec) {
  constexpr const char* kOp = "MoeRouteBackward";
  if (failed()) return;
  if (!IsF32(*this, kOp, dscores) || !IsF32(*this, kOp, dgate) || !IsF32(*this, kOp, scores) ||
      !IsI32(*this, kOp, topk_idx)) {
    return;
  }
  const int64_t N = scores.rows(), E = scores.cols(), K = topk_idx.cols();
  if (!Check(
          *this, kOp,
          dscores.rows() == N && dscores.cols() == E && dgate.rows() == N && dgate.cols() == K && topk_idx.rows() == N,
          "shapes disagree: dscores " + Shape(dscores) + ", dgate " + Shape(dgate) + ", scores " + Shape(scores) +
              ", topk_idx " + Shape(topk_idx))) {
    return;
  }
  if (N == 0 || K == 0) return;
  constexpr int kThreads = 256;
  RouteBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream()>>>(
      dscores.data<float>(), dgate.data<float>(), scores.data<float>(), topk_idx.data<int32_t>(), N,
      static_cast<int>(E), static_cast<int>(K), spec.scale, spec.normalize);
  LaunchOk(*this, kOp);
}

// ---- load and the permutation --------------------------------------------------------

void CudaBackend::MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) {
  constexpr const char* kOp = "MoeExpertLoad";
  if (failed()) return;
  if (!IsI32(*this, kOp, counts) || !IsI32(*this, kOp, topk_idx)) return;
  const int E = n_experts;
  if (!Check(*this, kOp, counts.numel() == E, "counts " + Shape(counts) + " must hold E=" + std::to_string(E)) ||
      !Check(*this, kOp, E >= 1 && E <= kMaxExperts, "needs 1 <= E <= 8192, E=" + std::to_string(E))) {
    return;
  }
  if (!CudaOk(*this, kOp, cudaMemsetAsync(counts.raw(), 0, counts.bytes(), stream()), "cudaMemsetAsync")) return;
  const int64_t total = topk_idx.numel();
  if (total == 0) return;
  constexpr int kChunk = 16 * kHistThreads;
  ChunkCountsKernel<<<Blocks(total, kChunk), kHistThreads, E * sizeof(int), stream()>>>(
      nullptr, counts.data<int32_t>(), topk_idx.data<int32_t>(), total, E, kChunk);
  LaunchOk(*this, kOp);
}

void CudaBackend::MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx,
                             int n_experts) {
  constexpr const char* kOp = "MoePermute";
  if (failed()) return;
  if (!IsF32(*this, kOp, x_sorted) || !IsI32(*this, kOp, offsets) || !IsI32(*this, kOp, slot) ||
      !IsF32(*this, kOp, x) || !IsI32(*this, kOp, topk_idx)) {
    return;
  }
  const int64_t N = topk_idx.rows(), K = topk_idx.cols(), D = x.cols(), total = N * K;
  const int E = n_experts;
  if (!Check(*this, kOp, x.rows() == N && x_sorted.rows() == total && x_sorted.cols() == D && slot.numel() == total,
             "shapes disagree: x " + Shape(x) + ", x_sorted " + Shape(x_sorted) + ", slot " + Shape(slot) +
                 ", topk_idx " + Shape(topk_idx)) ||
      !Check(*this, kOp, offsets.numel() == E + 1,
             "offsets " + Shape(offsets) + " must hold E+1=" + std::to_string(E + 1)) ||
      !Check(*this, kOp, E >= 1 && E <= kMaxExperts, "needs 1 <= E <= 8192, E=" + std::to_string(E)) ||
      !Check(*this, kOp, total < (int64_t{1} << 31), "N*K=" + std::to_string(total) + " overflows I32 slots")) {
    return;
  }
  cudaStream_t s = stream();
  if (total == 0) {
    CudaOk(*this, kOp, cudaMemsetAsync(offsets.raw(), 0, offsets.bytes(), s), "cudaMemsetAsync");
    return;
  }
  // Warps per RankScatter block: as many as fit their (warps, E) counters.
  const int warps =
      static_cast<int>(std::clamp<size_t>(kSmemLimit / (static_cast<size_t>(E) * sizeof(int)), 1, kMaxRankWarps));
  const int64_t chunk = static_cast<int64_t>(warps) * kRankSub;
  const int64_t chunks = CeilDiv(total, chunk);
  auto* table = static_cast<int32_t*>(Workspace(static_cast<size_t>(chunks) * E * sizeof(int32_t)));  // (chunks, E)
  if (table == nullptr) return;  // Workspace failed already
  int32_t* off = offsets.data<int32_t>();
  const int32_t* idx = topk_idx.data<int32_t>();

  ChunkCountsKernel<<<static_cast<unsigned>(chunks), kHistThreads, E * sizeof(int), s>>>(table, nullptr, idx, total, E,
                                                                                         static_cast<int>(chunk));
  if (!LaunchOk(*this, kOp)) return;
  ScanCountsKernel<<<1, kScanThreads, E * sizeof(int), s>>>(table, off, static_cast<int>(chunks), E);
  if (!LaunchOk(*this, kOp)) return;
  RankScatterKernel<<<static_cast<unsigned>(chunks), warps * kWarp, static_cast<size_t>(warps) * E * sizeof(int), s>>>(
      slot.data<int32_t>(), idx, table, off, total, E);
  if (!LaunchOk(*this, kOp)) return;
  if (D == 0) return;
  const bool vec = D % 4 == 0 && Aligned16(x.raw()) && Aligned16(x_sorted.raw());
  const unsigned blocks = Blocks(N, kRowWarps);
  if (vec) {  // float4 path: rows 16-byte aligned, D % 4 == 0
    PermuteRowsKernel<4><<<blocks, kRowWarps * kWarp, 0, s>>>(x_sorted.data<float>(), x.data<float>(),
                                                              slot.data<int32_t>(), N, static_cast<int>(K), D);
  } else {
    PermuteRowsKernel<1><<<blocks, kRowWarps * kWarp, 0, s>>>(x_sorted.data<float>(), x.data<float>(),
                                                              slot.data<int32_t>(), N, static_cast<int>(K), D);
  }
  LaunchOk(*this, kOp);
}

void CudaBackend::MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) {
  constexpr const char* kOp = "MoePermuteBackward";
  if (failed()) return;
  if (!IsF32(*this, kOp, dx) || !IsF32(*this, kOp, dx_sorted) || !IsI32(*this, kOp, slot)) return;
  const int64_t N = slot.rows(), K = slot.cols(), D = dx.cols();
  if (!Check(*this, kOp, dx.rows() == N && dx_sorted.rows() == N * K && dx_sorted.cols() == D,
             "shapes disagree: dx " + Shape(dx) + ", dx_sorted " + Shape(dx_sorted) + ", slot " + Shape(slot))) {
    return;
  }
  if (N == 0 || D == 0) return;
  const bool vec = D % 4 == 0 && Aligned16(dx.raw()) && Aligned16(dx_sorted.raw());
  const unsigned blocks = Blocks(N, kRowWarps);
  cudaStream_t s = stream();
  if (vec) {  // float4 path: rows 16-byte aligned, D % 4 == 0
    PermuteBackwardKernel<4><<<blocks, kRowWarps * kWarp, 0, s>>>(dx.data<float>(), dx_sorted.data<float>(),
                                                                  slot.data<int32_t>(), N, static_cast<int>(K), D);
  } else {
    PermuteBackwardKernel<1><<<blocks, kRowWarps * kWarp, 0, s>>>(dx.data<float>(), dx_sorted.data<float>(),
                                                                  slot.data<int32_t>(), N, static_cast<int>(K), D);
  }
  LaunchOk(*this, kOp);
}

// ---- combine ---------------------------------------------------------------------------

void CudaBackend::MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  constexpr const char* kOp = "MoeCombine";
  if (failed()) return;
  if (!IsF32(*this, kOp, y) || !IsF32(*this, kOp, y_sorted) || !IsF32(*this, kOp, gate) || !IsI32(*this, kOp, slot)) {
    return;
  }
  const int64_t N = slot.rows(), K = slot.cols(), D = y.cols();
  if (!Check(*this, kOp, y.rows() == N && y_sorted.rows() == N * K && y_sorted.cols() == D && gate.numel() == N * K,
             "shapes disagree: y " + Shape(y) + ", y_sorted " + Shape(y_sorted) + ", gate " + Shape(gate) + ", slot " +
                 Shape(slot))) {
    return;
  }
  if (N == 0 || D == 0) return;
  const bool vec = D % 4 == 0 && Aligned16(y.raw()) && Aligned16(y_sorted.raw());
  const unsigned blocks = Blocks(N, kRowWarps);
  cudaStream_t s = stream();
  if (vec) {  // float4 path: rows 16-byte aligned, D % 4 == 0
    CombineKernel<4><<<blocks, kRowWarps * kWarp, 0, s>>>(y.data<float>(), y_sorted.data<float>(), gate.data<float>(),
                                                          slot.data<int32_t>(), N, static_cast<int>(K), D);
  } else {
    CombineKernel<1><<<blocks, kRowWarps * kWarp, 0, s>>>(y.data<float>(), y_sorted.data<float>(), gate.data<float>(),
                                                          slot.data<int32_t>(), N, static_cast<int>(K), D);
  }
  LaunchOk(*this, kOp);
}

void CudaBackend::MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted,
                                     const Tensor& gate, const Tensor& slot) {
  constexpr const char* kOp = "MoeCombineBackward";
  if (failed()) return;
  if (!IsF32(*this, kOp, dy_sorted) || !IsF32(*this, kOp, dgate) || !IsF32(*this, kOp, dy) ||
      !IsF32(*this, kOp, y_sorted) || !IsF32(*this, kOp, gate) || !IsI32(*this, kOp, slot)) {
    return;
  }
  const int64_t N = slot.rows(), K = slot.cols(), D = dy.cols();
  if (!Check(*this, kOp,
             dy.rows() == N && y_sorted.rows() == N * K && y_sorted.cols() == D && dy_sorted.rows() == N * K &&
                 dy_sorted.cols() == D && dgate.numel() == N * K && gate.numel() == N * K,
             "shapes disagree: dy_sorted " + Shape(dy_sorted) + ", dgate " + Shape(dgate) + ", dy " + Shape(dy) +
                 ", y_sorted " + Shape(y_sorted) + ", gate " + Shape(gate) + ", slot " + Shape(slot))) {
    return;
  }
  if (N == 0 || K == 0) return;
  const bool vec = D % 4 == 0 && Aligned16(dy.raw()) && Aligned16(y_sorted.raw()) && Aligned16(dy_sorted.raw());
  const unsigned blocks = Blocks(N, kRowWarps);
  cudaStream_t s = stream();
  if (vec) {  // float4 path: rows 16-byte aligned, D % 4 == 0
    CombineBackwardKernel<4><<<blocks, kRowWarps * kWarp, 0, s>>>(
        dy_sorted.data<float>(), dgate.data<float>(), dy.data<float>(), y_sorted.data<float>(), gate.data<float>(),
        slot.data<int32_t>(), N, static_cast<int>(K), D);
  } else {
    CombineBackwardKernel<1><<<blocks, kRowWarps * kWarp, 0, s>>>(
        dy_sorted.data<float>(), dgate.data<float>(), dy.data<float>(), y_sorted.data<float>(), gate.data<float>(),
        slot.data<int32_t>(), N, static_cast<int>(K), D);
  }
  LaunchOk(*this, kOp);
}

// ---- balance loss ----------------------------------------------------------------------

void CudaBackend::MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                                 double alpha) {
  constexpr const char* kOp = "MoeBalanceLoss";
  if (failed()) return;
  if (!IsF32(*this, kOp, loss) || !IsF32(*this, kOp, scores) || !IsI32(*this, kOp, topk_idx)) return;
  const int64_t N = scores.rows(), E = scores.cols(), K = topk_idx.cols();
  if (!Check(*this, kOp, seq_len > 0 && N % seq_len == 0 && topk_idx.rows() == N && loss.numel() == N / seq_len,
             "needs seq_len dividing N and loss [N / seq_len]: seq_len=" + std::to_string(seq_len) + ", scores " +
                 Shape(scores) + ", topk_idx " + Shape(topk_idx) + ", loss " + Shape(loss)) ||
      !Check(*this, kOp, E >= 1 && K >= 1 && E * (sizeof(double) + sizeof(int)) <= kSmemLimit,
             "needs K >= 1 and 1 <= E <= 4096, E=" + std::to_string(E))) {
    return;
  }
  const int64_t B = N / seq_len;
  if (B == 0) return;
  const int warps = static_cast<int>(std::clamp<int64_t>(
      static_cast<int64_t>((kSmemLimit - E * sizeof(int)) / (E * sizeof(double))), 1, kMaxLossWarps));
  const size_t smem = static_cast<size_t>(warps) * E * sizeof(double) + E * sizeof(int);
  const double f_scale = static_cast<double>(E) / (static_cast<double>(K) * static_cast<double>(seq_len));
  BalanceLossKernel<<<static_cast<unsigned>(B), warps * kWarp, smem, stream()>>>(
      loss.data<float>(), scores.data<float>(), topk_idx.data<int32_t>(), seq_len, static_cast<int>(K),
      static_cast<int>(E), f_scale, alpha);
  LaunchOk(*this, kOp);
}

void CudaBackend::MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                                         double alpha, double dloss) {
  constexpr const char* kOp = "MoeBalanceLossBackward";
  if (failed()) return;
  if (!IsF32(*this, kOp, dscores) || !IsF32(*this, kOp, scores) || !IsI32(*this, kOp, topk_idx)) return;
  const int64_t N = scores.rows(), E = scores.cols(), K = topk_idx.cols();
  if (!Check(*this, kOp, seq_len > 0 && N % seq_len == 0 && topk_idx.rows() == N && dscores.numel() == N * E,
             "needs seq_len dividing N and dscores like scores: seq_len=" + std::to_string(seq_len) + ", scores " +
                 Shape(scores) + ", topk_idx " + Shape(topk_idx) + ", dscores " + Shape(dscores)) ||
      !Check(*this, kOp, E >= 1 && K >= 1 && E <= kMaxExperts,
             "needs K >= 1 and 1 <= E <= 8192, E=" + std::to_string(E))) {
    return;
  }
  const int64_t B = N / seq_len;
  if (B == 0) return;
  auto* counts = static_cast<int32_t*>(Workspace(static_cast<size_t>(B * E) * sizeof(int32_t)));  // (B, E)
  if (counts == nullptr) return;
  cudaStream_t s = stream();
  SequenceCountsKernel<<<static_cast<unsigned>(B), kHistThreads, E * sizeof(int), s>>>(
      counts, topk_idx.data<int32_t>(), seq_len, static_cast<int>(K), static_cast<int>(E));
  if (!LaunchOk(*this, kOp)) return;
  const double coef = dloss * alpha * static_cast<double>(E) /
                      (static_cast<double>(K) * static_cast<double>(seq_len) * static_cast<double>(seq_len));
  BalanceLossBackwardKernel<<<Blocks(N, kRowWarps), kRowWarps * kWarp, 0, s>>>(
      dscores.data<float>(), scores.data<float>(), counts, N, seq_len, static_cast<int>(E), coef);
  LaunchOk(*this, kOp);
}

}  // namespace troupe
