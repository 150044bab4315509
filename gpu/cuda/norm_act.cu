// CUDA normalisation, activations, embedding and the cross-entropy loss.
//
// Forward/backward pairs, llm.c style, each checked against gpu/cpu/norm_act.cpp
// by tests/cuda_dense_test.cpp. Everything is deterministic (no float atomics):
//  - RMSNorm: one warp per row; dw = sum over rows is split into FIXED chunks
//    of rows (per-chunk double partials in scratch), then summed chunk by chunk
//    in order by a second kernel.
//  - Embedding backward: the (token, position) pairs are sorted by token with a
//    stable LSD radix sort (8-bit digits; per-block digit counts, a scan, and a
//    stable scatter whose in-block ranks come from warp matching), then one
//    pass sums each token's rows of dout in position order. Cost: a few small
//    kernels per 8 bits of V, plus reading dout once.
//  - Cross-entropy: one block per row, online max / sum-of-exp, fixed-tree
//    block reduction.
// Row sums (RMSNorm) accumulate in double like the CPU reference.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_util.cuh"

namespace troupe {
namespace {

using namespace cuda_util;  // the shared launch / check helpers

constexpr int kWarpsPerBlock = kThreads / 32;

// Same branch structure as the CPU's Sigmoid: never exp of a large positive.
__device__ __forceinline__ float SigmoidF(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

// ---- RMSNorm kernels -------------------------------------------------------------

// One warp per row: rstd = 1 / sqrt(mean(x^2) + eps), out = x * rstd * w.
__global__ void RmsNormForwardKernel(float* __restrict__ out, float* __restrict__ rstd, const float* __restrict__ in,
                                     const float* __restrict__ w, int64_t N, int64_t C, double eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;  // whole warps leave together
  const float* x = in + row * C;
  double ss = 0.0;
  for (int64_t j = lane; j < C; j += 32) ss += static_cast<double>(x[j]) * x[j];
  ss = WarpSumDouble(ss);
  const float r = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(C) + eps));
  if (lane == 0) rstd[row] = r;  // backward uses exactly this value
  float* y = out + row * C;
  for (int64_t j = lane; j < C; j += 32) y[j] = x[j] * r * w[j];
}

// One warp per row: din += rstd * (g - xh * mean(g * xh)), g = dout * w, xh = x * rstd.
__global__ void RmsNormBackwardInputKernel(float* __restrict__ din, const float* __restrict__ dout,
                                           const float* __restrict__ in, const float* __restrict__ w,
                                           const float* __restrict__ rstd, int64_t N, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const float* x = in + row * C;
  const float* gr = dout + row * C;
  const double r = rstd[row];
  double dot = 0.0;
  for (int64_t j = lane; j < C; j += 32) dot += static_cast<double>(gr[j]) * w[j] * x[j] * r;
  const double mean = WarpSumDouble(dot) / static_cast<double>(C);
  float* dx = din + row * C;
  for (int64_t j = lane; j < C; j += 32) {
    const double g = static_cast<double>(gr[j]) * w[j];
    dx[j] += static_cast<float>(r * (g - static_cast<double>(x[j]) * r * mean));
  }
}

constexpr int64_t kDwRowChunk = 128;  // rows per dw partial: fixed, so the sum order is too

// partial[chunk, j] = sum over the chunk's rows, in order, of dout * x * rstd.
__global__ void RmsNormDwPartialKernel(double* __restrict__ partial, const float* __restrict__ dout,
                                       const float* __restrict__ in, const float* __restrict__ rstd, int64_t N,
                                       int64_t C) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kDwRowChunk;
  const int64_t n1 = n0 + kDwRowChunk < N ? n0 + kDwRowChunk : N;
  double acc = 0.0;
  for (int64_t n = n0; n < n1; ++n) acc += static_cast<double>(dout[n * C + j]) * in[n * C + j] * rstd[n];
  partial[static_cast<int64_t>(blockIdx.y) * C + j] = acc;
}

// dw[j] += sum over chunks, in chunk order.
__global__ void RmsNormDwFinalKernel(float* __restrict__ dw, const double* __restrict__ partial, int64_t chunks,
                                     int64_t C) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  double acc = 0.0;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * C + j];
  dw[j] += static_cast<float>(acc);
}

// ---- elementwise functors -------------------------------------------------------

struct SwiGluForwardOp {
  float* out;            // (N, F)
  const float* gate_up;  // (N, 2F): gate | up
  int64_t F;
  __device__ void operator()(int64_t n, int64_t j) const {
    const float g = gate_up[n * 2 * F + j], u = gate_up[n * 2 * F + F + j];
    out[n * F + j] = g * SigmoidF(g) * u;
  }
};

// silu(g) = g s, s = sigmoid(g);  silu'(g) = s (1 + g (1 - s)).
struct SwiGluBackwardOp {
  float* dgate_up;       // (N, 2F)
  const float* dout;     // (N, F)
  const float* gate_up;  // (N, 2F)
  int64_t F;
  __device__ void operator()(int64_t n, int64_t j) const {
    const float g = gate_up[n * 2 * F + j], u = gate_up[n * 2 * F + F + j];
    const float dy = dout[n * F + j];
    const float s = SigmoidF(g);
    dgate_up[n * 2 * F + j] += dy * u * s * (1.0f + g * (1.0f - s));
    dgate_up[n * 2 * F + F + j] += dy * g * s;
  }
};

struct SigmoidForwardOp {
  float* out;
  const float* in;
  __device__ void operator()(int64_t i) const { out[i] = SigmoidF(in[i]); }
};

struct SigmoidBackwardOp {
  float* din;
  const float* dout;
  const float* out;
  __device__ void operator()(int64_t i) const { din[i] += dout[i] * out[i] * (1.0f - out[i]); }
};

// out[n] = table[tokens[n]]; a token outside [0, V) is a caller bug: its row
// becomes NaN so that it cannot pass unnoticed (the CPU backend asserts).
struct EmbeddingForwardOp {
  float* out;             // (N, D)
  const int32_t* tokens;  // (N)
  const float* table;     // (V, D)
  int64_t V, D;
  __device__ void operator()(int64_t n, int64_t j) const {
    const int32_t t = tokens[n];
    out[n * D + j] = (t >= 0 && t < V) ? table[static_cast<int64_t>(t) * D + j] : __int_as_float(0x7fc00000);
  }
};

// ---- embedding backward: stable radix sort by token, then segment sums ------------

constexpr int kRadixBits = 8;
constexpr int kRadixDigits = 1 << kRadixBits;  // == kThreads: thread d owns digit d
constexpr int kRadixTile = kThreads;           // keys ranked together
constexpr int kRadixTilesPerBlock = 8;
constexpr int64_t kRadixChunk = static_cast<int64_t>(kRadixTile) * kRadixTilesPerBlock;  // keys per block
static_assert(kRadixDigits == kThreads, "scatter kernel maps one thread to one digit");

// keys[n] = tokens[n] (V for a token outside [0, V): sorted last, ignored); vals[n] = n.
__global__ void RadixInitKernel(uint32_t* __restrict__ keys, int32_t* __restrict__ vals,
                                const int32_t* __restrict__ tokens, int64_t N, int64_t V) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t t = tokens[i];
    keys[i] = (t >= 0 && t < V) ? static_cast<uint32_t>(t) : static_cast<uint32_t>(V);
    vals[i] = static_cast<int32_t>(i);
  }
}

// hist[d * n_blocks + b] = how many keys of block b's chunk have digit d.
// (Integer atomics: the counts do not depend on their order.)
__global__ void RadixHistKernel(int32_t* __restrict__ hist, const uint32_t* __restrict__ keys, int64_t N, int shift) {
  __shared__ int32_t h[kRadixDigits];
  h[threadIdx.x] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kRadixChunk;
  const int64_t end = begin + kRadixChunk < N ? begin + kRadixChunk : N;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    atomicAdd(&h[(keys[i] >> shift) & (kRadixDigits - 1)], 1);
  __syncthreads();
  hist[static_cast<int64_t>(threadIdx.x) * gridDim.x + blockIdx.x] = h[threadIdx.x];
}

// In-place exclusive prefix sum of data[0, count) by one block of 1024 threads,
// each owning a contiguous run.
__global__ void ExclusiveScanKernel(int32_t* data, int64_t count) {
  __shared__ int32_t sums[1024];
  const int64_t per = (count + blockDim.x - 1) / blockDim.x;
  const int64_t b = threadIdx.x * per, e = b + per < count ? b + per : count;
  int32_t s = 0;
  for (int64_t i = b; i < e; ++i) s += data[i];
  sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) {
      const int32_t c = sums[t];
      sums[t] = run;
      run += c;
    }
  }
  __syncthreads();
  int32_t run = sums[threadIdx.x];
  for (int64_t i = b; i < e; ++i) {
    const int32_t c = data[i];
    data[i] = run;
    run += c;
  }
}

// Stable scatter of block b's chunk by digit: key i goes to
//   offs[d, b] + (keys of digit d earlier in the chunk).
// The chunk is ranked one tile of 256 keys at a time; within a tile, a key's
// rank = same-digit keys in earlier warps (per-warp counts, prefix over warps)
// + same-digit keys in earlier lanes of its warp (__match_any_sync).
__global__ void RadixScatterKernel(uint32_t* __restrict__ keys_out, int32_t* __restrict__ vals_out,
                                   const uint32_t* __restrict__ keys_in, const int32_t* __restrict__ vals_in,
                                   const int32_t* __restrict__ offs, int64_t N, int shift) {
  __shared__ int32_t base[kRadixDigits];                    // next free slot of each digit
  __shared__ int32_t wcount[kWarpsPerBlock][kRadixDigits];  // this tile: per-warp digit counts -> prefixes
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  base[tid] = offs[static_cast<int64_t>(tid) * gridDim.x + blockIdx.x];
  for (int tile = 0; tile < kRadixTilesPerBlock; ++tile) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kRadixChunk + static_cast<int64_t>(tile) * kRadixTile + tid;
    const bool valid = i < N;
    const uint32_t key = valid ? keys_in[i] : 0u;
    const uint32_t d = (key >> shift) & (kRadixDigits - 1);
    for (int w = 0; w < kWarpsPerBlock; ++w) wcount[w][tid] = 0;
    __syncthreads();
    // Invalid lanes match each other only (kRadixDigits is not a digit).
    unsigned peers = __match_any_sync(0xffffffffu, valid ? d : static_cast<uint32_t>(kRadixDigits));
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (valid && rank == 0) wcount[warp][d] = __popc(peers);
    __syncthreads();
    int32_t total = 0;  // thread tid: digit tid
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const int32_t c = wcount[w][tid];
      wcount[w][tid] = total;
      total += c;
    }
    __syncthreads();
    if (valid) {
      const int32_t pos = base[d] + wcount[warp][d] + rank;
      keys_out[pos] = key;
      vals_out[pos] = vals_in[i];
    }
    __syncthreads();
    base[tid] += total;
    // The next tile's first __syncthreads orders this update before any read.
  }
}

// For each run of equal keys (one token, its positions ascending):
// dtable[token, j] += sum of dout[pos, j] over the run, with four interleaved
// accumulators combined in a fixed order. Block (x: 32 sorted positions,
// y: 256 columns); a run is summed by the block holding its first position.
constexpr int kSegPositions = 32;

__global__ void EmbeddingSegmentSumKernel(float* __restrict__ dtable, const float* __restrict__ dout,
                                          const uint32_t* __restrict__ keys, const int32_t* __restrict__ vals,
                                          int64_t N, int64_t V, int64_t D) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kSegPositions;
  const int64_t p1 = p0 + kSegPositions < N ? p0 + kSegPositions : N;
  for (int64_t p = p0; p < p1; ++p) {
    const uint32_t key = keys[p];
    if (key >= V) break;                        // invalid tokens are sorted last
    if (p > 0 && keys[p - 1] == key) continue;  // not the start of a run
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t e = p;
    // keys are sorted, so keys[e + 3] == key implies keys[e..e+3] == key.
    for (; e + 3 < N && keys[e + 3] == key; e += 4) {
      a0 += dout[static_cast<int64_t>(vals[e]) * D + j];
      a1 += dout[static_cast<int64_t>(vals[e + 1]) * D + j];
      a2 += dout[static_cast<int64_t>(vals[e + 2]) * D + j];
      a3 += dout[static_cast<int64_t>(vals[e + 3]) * D + j];
    }
    for (; e < N && keys[e] == key; ++e) a0 += dout[static_cast<int64_t>(vals[e]) * D + j];
    dtable[static_cast<int64_t>(key) * D + j] += (a0 + a1) + (a2 + a3);
  }
}

// ---- cross-entropy kernels ----------------------------------------------------------

constexpr int kCeThreads = 512;

// Combines (max, sum of exp(x - max)) pairs.
// A NaN max marks a row that saw a NaN logit: it stays NaN (as on the CPU).
__device__ __forceinline__ void MergeMaxSum(float& m, float& s, float m2, float s2) {
  if (m != m || m2 != m2) {
    m = s = __int_as_float(0x7fc00000);
    return;
  }
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? 0.f : s * expf(m - mx)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mx));
  m = mx;
}

// Online max / sum over the row, then a fixed-tree block reduction. Returns
// log(sum(exp(x))) to every thread. Contains __syncthreads: call from all threads.
__device__ float RowLogSumExp(const float* x, int64_t V) {
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = x[j];
    if (v > m) {
      s = (m == -INFINITY ? 0.f : s * expf(m - v)) + 1.f;
      m = v;
    } else if (v == v) {  // v <= m (or m is already NaN: s becomes NaN)
      s += (m == -INFINITY) ? 0.f : expf(v - m);
    } else {
      m = s = v;  // a NaN logit makes a NaN loss
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    MergeMaxSum(m, s, m2, s2);
  }
  __shared__ float wm[32], ws[32];
  __shared__ float result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    wm[warp] = m;
    ws[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    m = lane < n_warps ? wm[lane] : -INFINITY;
    s = lane < n_warps ? ws[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      MergeMaxSum(m, s, m2, s2);
    }
    if (lane == 0) result = static_cast<float>(static_cast<double>(m) + log(static_cast<double>(s)));
  }
  __syncthreads();
  return result;
}

// One block per row. A target >= V is a caller bug: loss NaN (CPU asserts).
__global__ void CrossEntropyForwardKernel(float* __restrict__ losses, const float* __restrict__ logits,
                                          const int32_t* __restrict__ targets, int64_t V) {
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  if (t < 0 || t >= V) {  // uniform over the block
    if (threadIdx.x == 0) losses[row] = t < 0 ? 0.f : __int_as_float(0x7fc00000);
    return;
  }
  const float* x = logits + row * V;
  const float lse = RowLogSumExp(x, V);
  if (threadIdx.x == 0) losses[row] = lse - x[t];
}

// dlogits = dloss * (softmax - onehot); dlogits may alias logits: the whole
// row is read (inside RowLogSumExp, which ends in a barrier) before any write,
// and afterwards each thread reads then writes only its own elements.
__global__ void CrossEntropyBackwardKernel(float* dlogits, const float* logits, const int32_t* __restrict__ targets,
                                           int64_t V, float dloss) {
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  float* dx = dlogits + row * V;
  if (t < 0 || t >= V) {
    const float fill = t < 0 ? 0.f : __int_as_float(0x7fc00000);
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) dx[j] = fill;
    return;
  }
  const float* x = logits + row * V;
  const float lse = RowLogSumExp(x, V);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float p = expf(x[j] - lse);
    dx[j] = dloss * (p - (j == t ? 1.f : 0.f));
  }
}

}  // namespace

// ---- RMSNorm -----------------------------------------------------------------------

void CudaBackend::RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) {
  static const char* kOp = "RmsNormForward";
  if (failed() || !RequireF32(*this, kOp, {&out, &rstd, &in, &w})) return;
  const int64_t N = in.rows(), C = in.cols();
  if (!ShapeOk(*this, kOp, out.numel() == in.numel() && w.numel() == C && rstd.numel() == N,
               "in " + in.ShapeString() + ", out " + out.ShapeString() + ", w " + w.ShapeString() + ", rstd " +
                   rstd.ShapeString()))
    return;
  if (N == 0) return;
  RmsNormForwardKernel<<<static_cast<unsigned>(CeilDiv(N, kWarpsPerBlock)), kThreads, 0, stream()>>>(
      out.data<float>(), rstd.data<float>(), in.data<float>(), w.data<float>(), N, C, eps);
  LaunchOk(*this, kOp);
}

void CudaBackend::RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                                  const Tensor& rstd) {
  static const char* kOp = "RmsNormBackward";
  if (failed() || !RequireF32(*this, kOp, {&din, &dw, &dout, &in, &w, &rstd})) return;
  const int64_t N = in.rows(), C = in.cols();
  if (!ShapeOk(*this, kOp,
               din.numel() == in.numel() && dout.numel() == in.numel() && dw.numel() == C && w.numel() == C &&
                   rstd.numel() == N,
               "in " + in.ShapeString() + ", din " + din.ShapeString() + ", dout " + dout.ShapeString() + ", dw " +
                   dw.ShapeString() + ", rstd " + rstd.ShapeString()))
    return;
  if (N == 0 || C == 0) return;
  RmsNormBackwardInputKernel<<<static_cast<unsigned>(CeilDiv(N, kWarpsPerBlock)), kThreads, 0, stream()>>>(
      din.data<float>(), dout.data<float>(), in.data<float>(), w.data<float>(), rstd.data<float>(), N, C);
  if (!LaunchOk(*this, kOp)) return;
  const int64_t chunks = CeilDiv(N, kDwRowChunk);
  if (chunks > 65535) {
    Fail(kOp, "too many rows (" + std::to_string(N) + ")");
    return;
  }
  auto* partial = static_cast<double*>(Workspace(static_cast<size_t>(chunks * C) * sizeof(double)));
  if (partial == nullptr) return;
  const dim3 grid(static_cast<unsigned>(CeilDiv(C, kThreads)), static_cast<unsigned>(chunks));
  RmsNormDwPartialKernel<<<grid, kThreads, 0, stream()>>>(partial, dout.data<float>(), in.data<float>(),
                                                          rstd.data<float>(), N, C);
  if (!LaunchOk(*this, kOp)) return;
  RmsNormDwFinalKernel<<<static_cast<unsigned>(CeilDiv(C, kThreads)), kThreads, 0, stream()>>>(dw.data<float>(),
                                                                                               partial, chunks, C);
  LaunchOk(*this, kOp);
}

// ---- SwiGLU and sigmoid ---------------------------------------------------------------

void CudaBackend::SwiGluForward(Tensor& out, const Tensor& gate_up) {
  static const char* kOp = "SwiGluForward";
  if (failed() || !RequireF32(*this, kOp, {&out, &gate_up})) return;
  const int64_t N = gate_up.rows(), F = gate_up.cols() / 2;
  if (!ShapeOk(*this, kOp, gate_up.cols() == 2 * F && out.rows() == N && out.cols() == F,
               "gate_up " + gate_up.ShapeString() + ", out " + out.ShapeString()))
    return;
  LaunchRowCol(*this, kOp, N, F, SwiGluForwardOp{out.data<float>(), gate_up.data<float>(), F});
}

void CudaBackend::SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) {
  static const char* kOp = "SwiGluBackward";
  if (failed() || !RequireF32(*this, kOp, {&dgate_up, &dout, &gate_up})) return;
  const int64_t N = gate_up.rows(), F = gate_up.cols() / 2;
  if (!ShapeOk(
          *this, kOp,
          gate_up.cols() == 2 * F && dgate_up.numel() == gate_up.numel() && dout.rows() == N && dout.cols() == F,
          "gate_up " + gate_up.ShapeString() + ", dgate_up " + dgate_up.ShapeString() + ", dout " + dout.ShapeString()))
    return;
  LaunchRowCol(*this, kOp, N, F,
               SwiGluBackwardOp{dgate_up.data<float>(), dout.data<float>(), gate_up.data<float>(), F});
}

void CudaBackend::SigmoidForward(Tensor& out, const Tensor& in) {
  static const char* kOp = "SigmoidForward";
  if (failed() || !RequireF32(*this, kOp, {&out, &in})) return;
  if (!ShapeOk(*this, kOp, out.numel() == in.numel(), "in " + in.ShapeString() + ", out " + out.ShapeString())) return;
  LaunchForEach(*this, kOp, in.numel(), SigmoidForwardOp{out.data<float>(), in.data<float>()});
}

void CudaBackend::SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) {
  static const char* kOp = "SigmoidBackward";
  if (failed() || !RequireF32(*this, kOp, {&din, &dout, &out})) return;
  if (!ShapeOk(*this, kOp, din.numel() == out.numel() && dout.numel() == out.numel(),
               "din " + din.ShapeString() + ", dout " + dout.ShapeString() + ", out " + out.ShapeString()))
    return;
  LaunchForEach(*this, kOp, out.numel(), SigmoidBackwardOp{din.data<float>(), dout.data<float>(), out.data<float>()});
}

// ---- embedding ---------------------------------------------------------------------------

void CudaBackend::EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) {
  static const char* kOp = "EmbeddingForward";
  if (failed() || !RequireF32(*this, kOp, {&out, &table}) || !Require(*this, kOp, DType::kI32, {&tokens})) return;
  const int64_t N = tokens.numel(), V = table.rows(), D = table.cols();
  if (!ShapeOk(*this, kOp, out.rows() == N && out.cols() == D,
               "tokens " + tokens.ShapeString() + ", table " + table.ShapeString() + ", out " + out.ShapeString()))
    return;
  LaunchRowCol(*this, kOp, N, D,
               EmbeddingForwardOp{out.data<float>(), tokens.data<int32_t>(), table.data<float>(), V, D});
}

// dtable[tokens[n]] += dout[n], deterministically: radix-sort (token, n) by
// token (stable, so positions stay ascending inside a token), then sum runs.
void CudaBackend::EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) {
  static const char* kOp = "EmbeddingBackward";
  if (failed() || !RequireF32(*this, kOp, {&dtable, &dout}) || !Require(*this, kOp, DType::kI32, {&tokens})) return;
  const int64_t N = tokens.numel(), V = dtable.rows(), D = dtable.cols();
  if (!ShapeOk(*this, kOp, dout.rows() == N && dout.cols() == D,
               "tokens " + tokens.ShapeString() + ", dtable " + dtable.ShapeString() + ", dout " + dout.ShapeString()))
    return;
  if (N == 0 || D == 0 || V == 0) return;
  if (N > INT32_MAX || V >= UINT32_MAX) {
    Fail(kOp, "too many tokens or vocabulary rows for 32-bit sort keys");
    return;
  }
  // Keys are in [0, V] (V = ignored token): enough 8-bit passes to cover V.
  int bits = 1;
  while (bits < 32 && (static_cast<uint64_t>(V) >> bits) != 0) ++bits;
  const int passes = (bits + kRadixBits - 1) / kRadixBits;
  const int64_t blocks = CeilDiv(N, kRadixChunk);
  const int64_t hist_n = kRadixDigits * blocks;
  if (blocks > INT32_MAX / kRadixDigits) {
    Fail(kOp, "too many tokens");
    return;
  }
  // Scratch: keys and values, twice (ping-pong), then the digit histogram.
  const size_t bytes = static_cast<size_t>(4 * N + hist_n) * sizeof(int32_t);
  auto* scratch = static_cast<int32_t*>(Workspace(bytes));
  if (scratch == nullptr) return;
  uint32_t* keys[2] = {reinterpret_cast<uint32_t*>(scratch), reinterpret_cast<uint32_t*>(scratch + N)};
  int32_t* vals[2] = {scratch + 2 * N, scratch + 3 * N};
  int32_t* hist = scratch + 4 * N;

  RadixInitKernel<<<GridFor(N), kThreads, 0, stream()>>>(keys[0], vals[0], tokens.data<int32_t>(), N, V);
  if (!LaunchOk(*this, kOp)) return;
  int cur = 0;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * kRadixBits;
    RadixHistKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(hist, keys[cur], N, shift);
    if (!LaunchOk(*this, kOp)) return;
    ExclusiveScanKernel<<<1, 1024, 0, stream()>>>(hist, hist_n);
    if (!LaunchOk(*this, kOp)) return;
    RadixScatterKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(keys[1 - cur], vals[1 - cur],
                                                                                 keys[cur], vals[cur], hist, N, shift);
    if (!LaunchOk(*this, kOp)) return;
    cur = 1 - cur;
  }
  const dim3 grid(static_cast<unsigned>(CeilDiv(N, kSegPositions)), static_cast<unsigned>(CeilDiv(D, kThreads)));
  if (grid.y > 65535) {
    Fail(kOp, "embedding width too large");
    return;
  }
  EmbeddingSegmentSumKernel<<<grid, kThreads, 0, stream()>>>(dtable.data<float>(), dout.data<float>(), keys[cur],
                                                             vals[cur], N, V, D);
  LaunchOk(*this, kOp);
}

// ---- cross-entropy -------------------------------------------------------------------------

void CudaBackend::CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) {
  static const char* kOp = "CrossEntropyForward";
  if (failed() || !RequireF32(*this, kOp, {&losses, &logits}) || !Require(*this, kOp, DType::kI32, {&targets})) return;
  const int64_t N = logits.rows(), V = logits.cols();
  if (!ShapeOk(
          *this, kOp, targets.numel() == N && losses.numel() == N,
          "logits " + logits.ShapeString() + ", targets " + targets.ShapeString() + ", losses " + losses.ShapeString()))
    return;
  if (N == 0) return;
  if (N > INT32_MAX) {
    Fail(kOp, "too many rows");
    return;
  }
  CrossEntropyForwardKernel<<<static_cast<unsigned>(N), kCeThreads, 0, stream()>>>(
      losses.data<float>(), logits.data<float>(), targets.data<int32_t>(), V);
  LaunchOk(*this, kOp);
}

void CudaBackend::CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) {
  static const char* kOp = "CrossEntropyBackward";
  if (failed() || !RequireF32(*this, kOp, {&dlogits, &logits}) || !Require(*this, kOp, DType::kI32, {&targets})) return;
  const int64_t N = logits.rows(), V = logits.cols();
  if (!ShapeOk(*this, kOp, targets.numel() == N && dlogits.numel() == logits.numel(),
               "logits " + logits.ShapeString() + ", targets " + targets.ShapeString() + ", dlogits " +
                   dlogits.ShapeString()))
    return;
  if (N == 0) return;
  if (N > INT32_MAX) {
    Fail(kOp, "too many rows");
    return;
  }
  CrossEntropyBackwardKernel<<<static_cast<unsigned>(N), kCeThreads, 0, stream()>>>(
      dlogits.data<float>(), logits.data<float>(), targets.data<int32_t>(), V, static_cast<float>(dloss));
  LaunchOk(*this, kOp);
}

}  // namespace troupe
