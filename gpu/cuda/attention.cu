// CUDA MLA attention with decoupled RoPE (BRIEF §1): RoPE and a flash-style
// causal attention, forward/backward pairs. Reference: gpu/cpu/attention.cpp
// (same layouts, same shape inference); tests/cuda_attention_test.cpp checks
// one against the other.
//
// Layout: q [N, H, dh+dr] = [q_c | q_r] per head, kv [N, H, dh+dv] = [k_c | v]
// per head, k_rope [N, dr] shared by all heads; read in place.
//
// Tiling (flash attention 2, fp32 SIMT): one block of 256 threads, seen as a
// 16 x 16 grid (ty, tx), works on 64-row tiles. Thread (ty, tx) owns rows
// ty + 16 r (r < 4) and columns tx + 16 c of every 64 x 64 score tile, and the
// same rows of its accumulator tile (columns tx + 16 c, c < NC, NC = a
// compile-time bound on ceil(width / 16); columns past the width are computed
// on a clamped index and dropped). Rows of one score row live in 16
// consecutive lanes of one warp, so row max/sum are 4 xor-shuffles.
// Shared-memory tiles use an odd leading dimension so that both the 16 rows a
// half-warp walks and the 2 rows a warp broadcasts hit distinct banks.
//   forward : block = (query tile, head, sequence); loops over key tiles
//             0..diagonal with an online softmax; Q, K, V, P in shared memory,
//             O in registers. Saves lse = m + log(l).
//   backward: D_i = dout_i . out_i (one warp per row), then
//             dK/dV: block = (key tile, head, sequence), loops over query
//                    tiles diagonal..end, dK and dV in registers;
//             dQ   : block = (query tile, head, sequence), loops over key
//                    tiles 0..diagonal, dQ in registers;
//             dk_rope: per-head partials [N, H, dr] in Workspace, summed over
//                    heads in head order by one more kernel.
//   Both backward passes recompute P = exp(S - lse) (S costs twice, no T x T
//   buffer, no atomics).
// Cost: forward ~ N T H (dh+dr+dv) flops (2 per multiply-add, causal half),
// backward ~3x that (S and dP are computed by both backward kernels); memory
// O(N H (dh+dr+dv)) plus the [N,H] and [N,H,dr] scratch. Shared memory per
// block at V3 widths (192, 128): forward 145 KiB, dQ 181 KiB, dK/dV 194 KiB,
// so one block (8 warps) per SM there; small widths fit several.
//
// Determinism: every output element is written by exactly one thread with a
// fixed summation order; no atomics anywhere. Results are bitwise repeatable.
//
// Limits: dh+dr <= 256 and dv <= 256 (register tiers), and the shared memory
// of a block (dK/dV kernel: 4 * 64 * (2*ld(dh+dr) + 2*ld(dv) + 2*65 + 2)
// bytes) must fit the device's opt-in limit (227 KiB on sm_90): V3's
// dh+dr = 192, dv = 128 needs 194 KiB. Larger dims fail with a message.
//
// Where tensor cores would go: the four tile products (Q K^T, P V in the
// forward; K Q^T, V dO^T, P^T dO, dS^T Q, dS K in the backward) are plain
// 64 x 64 x width GEMMs on shared-memory tiles; bf16 mma.sync (m16n8k16) or
// wgmma with fp32 accumulators would replace the fmaf loops, with the online
// softmax kept in fp32 registers.
#include <cuda_runtime.h>

#include <cmath>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_util.cuh"

namespace troupe {
namespace {

using cuda_util::Blocks;
using cuda_util::LaunchOk;
using cuda_util::RequireF32;

constexpr int kThreads = 256;    // 16 x 16 thread grid
constexpr int kTile = 64;        // rows of every tile (queries or keys)
constexpr int kR = kTile / 16;   // rows (and score columns) per thread
constexpr int kMaxWidth = 256;   // widest dh+dr or dv (register tiers)
constexpr int kLdP = kTile | 1;  // leading dimension of score tiles

// Odd leading dimension of a shared tile `cols` wide (bank-conflict free).
__host__ __device__ constexpr int Ld(int cols) { return cols | 1; }

// Sizes of one call (see Backend::MlaAttentionForward).
struct MlaShape {
  int T, H, dh, dr, dv;
  float scale;
};

// ---- small device helpers ------------------------------------------------------

// Max / sum over the 16 lanes (same ty) that hold one score row. Every lane
// ends with the same, bitwise identical value (the butterfly is symmetric).
__device__ __forceinline__ float RowMax(float v) {
  for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float RowSum(float v) {
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// dst (kTile, ld) <- rows [0, kTile) x cols [0, cols) of a strided global
// matrix; rows >= valid_rows become 0 (so 0 * pad never makes a NaN).
__device__ void LoadTile(float* __restrict__ dst, int ld, const float* __restrict__ src, int64_t stride, int cols,
                         int valid_rows) {
  for (int e = threadIdx.x; e < kTile * cols; e += kThreads) {
    const int r = e / cols, c = e - r * cols;
    dst[r * ld + c] = r < valid_rows ? src[r * stride + c] : 0.f;
  }
}

// Keys of tile k0: [k_c | k_r] rows into dst (kTile, ld).
__device__ void LoadKeys(float* dst, int ld, const float* kv, const float* k_rope, int64_t tok0, int h,
                         const MlaShape& s, int valid_rows) {
  const int64_t kvs = s.dh + s.dv;
  LoadTile(dst, ld, kv + (tok0 * s.H + h) * kvs, s.H * kvs, s.dh, valid_rows);
  LoadTile(dst + s.dh, ld, k_rope + tok0 * s.dr, s.dr, s.dr, valid_rows);
}

// Values of tile k0 into dst (kTile, ld).
__device__ void LoadValues(float* dst, int ld, const float* kv, int64_t tok0, int h, const MlaShape& s,
                           int valid_rows) {
  const int64_t kvs = s.dh + s.dv;
  LoadTile(dst, ld, kv + (tok0 * s.H + h) * kvs + s.dh, s.H * kvs, s.dv, valid_rows);
}

// ---- RoPE --------------------------------------------------------------------------

// One thread per (token n, pair j): the angle and its sin/cos in double (pos
// reaches 4096+, where a float angle would lose ~5e-4 rad), then every head.
__global__ void RopeKernel(float* __restrict__ x,  // (N, H, Dh), in place
                           int64_t N, int64_t H, int64_t Dh, int rot_offset, int rot_dim, int seq_len, double theta,
                           double sign) {
  const int half = rot_dim / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * half) return;
  const int64_t n = idx / half;
  const int j = static_cast<int>(idx - n * half);
  const double inv_freq = pow(theta, -2.0 * j / rot_dim);
  const double angle = static_cast<double>(n % seq_len) * inv_freq;
  double sn, cs;
  sincos(angle, &sn, &cs);
  sn *= sign;
  for (int64_t h = 0; h < H; ++h) {
    float* p = x + (n * H + h) * Dh + rot_offset + 2 * j;
    const double x0 = p[0], x1 = p[1];
    p[0] = static_cast<float>(cs * x0 - sn * x1);
    p[1] = static_cast<float>(sn * x0 + cs * x1);
  }
}

// ---- forward -------------------------------------------------------------------------

// Block (query tile, head, sequence); query tiles in reverse so the longest
// rows start first. Shared: Qs, Ks (kTile, ld(D)), Vs (kTile, ld(dv)), Ps (kTile, kLdP).
template <int NCV>
__global__ void __launch_bounds__(kThreads) MlaForwardKernel(float* __restrict__ out,           // (N, H, dv)
                                                             float* __restrict__ lse,           // (N, H)
                                                             const float* __restrict__ q,       // (N, H, dh+dr)
                                                             const float* __restrict__ kv,      // (N, H, dh+dv)
                                                             const float* __restrict__ k_rope,  // (N, dr)
                                                             MlaShape s) {
  extern __shared__ float smem[];
  const int D = s.dh + s.dr, ldq = Ld(D), ldv = Ld(s.dv);
  float* Qs = smem;
  float* Ks = Qs + kTile * ldq;
  float* Vs = Ks + kTile * ldq;
  float* Ps = Vs + kTile * ldv;
  const int h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int64_t seq0 = static_cast<int64_t>(blockIdx.z) * s.T;  // first token of the sequence
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  LoadTile(Qs, ldq, q + ((seq0 + q0) * s.H + h) * D, static_cast<int64_t>(s.H) * D, D, min(kTile, s.T - q0));

  float m[kR], l[kR], o[kR][NCV];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < NCV; ++c) o[r][c] = 0.f;
  }

  const int k_end = min(s.T, q0 + kTile);  // causal: keys [0, last query of the tile]
  for (int k0 = 0; k0 < k_end; k0 += kTile) {
    const int k_valid = min(kTile, s.T - k0);
    __syncthreads();  // the previous tile's P V is done with Ks, Vs, Ps
    LoadKeys(Ks, ldq, kv, k_rope, seq0 + k0, h, s, k_valid);
    LoadValues(Vs, ldv, kv, seq0 + k0, h, s, k_valid);
    __syncthreads();

    // S = Q K^T for this thread's 4 x 4 entries.
    float sc[kR][kR] = {};
    for (int d = 0; d < D; ++d) {
      float a[kR], b[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = Qs[(ty + 16 * r) * ldq + d];
#pragma unroll
      for (int c = 0; c < kR; ++c) b[c] = Ks[(tx + 16 * c) * ldq + d];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < kR; ++c) sc[r][c] = fmaf(a[r], b[c], sc[r][c]);
    }

    // Online softmax: rescale the running sums to the new row max.
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int i = q0 + ty + 16 * r;
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < kR; ++c) {
        const int j = k0 + tx + 16 * c;
        sc[r][c] = (i < s.T && j <= i) ? s.scale * sc[r][c] : -INFINITY;
        mx = fmaxf(mx, sc[r][c]);
      }
      const float m_new = fmaxf(m[r], RowMax(mx));
      const float alpha = m_new == -INFINITY ? 1.f : expf(m[r] - m_new);  // rows with nothing yet stay 0
      float rs = 0.f;
#pragma unroll
      for (int c = 0; c < kR; ++c) {
        const float p = sc[r][c] == -INFINITY ? 0.f : expf(sc[r][c] - m_new);
        Ps[(ty + 16 * r) * kLdP + tx + 16 * c] = p;
        rs += p;
      }
      l[r] = l[r] * alpha + RowSum(rs);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < NCV; ++c) o[r][c] *= alpha;
    }
    __syncthreads();

    // O += P V.
    for (int j = 0; j < k_valid; ++j) {
      float a[kR], b[NCV];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = Ps[(ty + 16 * r) * kLdP + j];
#pragma unroll
      for (int c = 0; c < NCV; ++c) b[c] = Vs[j * ldv + min(tx + 16 * c, s.dv - 1)];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < NCV; ++c) o[r][c] = fmaf(a[r], b[c], o[r][c]);
    }
  }

#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int i = q0 + ty + 16 * r;
    if (i >= s.T) continue;
    const int64_t row = (seq0 + i) * s.H + h;
    const float inv_l = 1.f / l[r];
#pragma unroll
    for (int c = 0; c < NCV; ++c) {
      const int col = tx + 16 * c;
      if (col < s.dv) out[row * s.dv + col] = o[r][c] * inv_l;
    }
    if (tx == 0) lse[row] = m[r] + logf(l[r]);
  }
}

// ---- backward ------------------------------------------------------------------------

// dvec[row] = dout[row] . out[row]; one warp per row of width dv.
__global__ void RowDotKernel(float* __restrict__ dvec,        // (N*H,)
                             const float* __restrict__ dout,  // (N*H, dv)
                             const float* __restrict__ out,   // (N*H, dv)
                             int64_t rows, int dv) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  float acc = 0.f;
  for (int c = lane; c < dv; c += 32) acc = fmaf(dout[row * dv + c], out[row * dv + c], acc);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) dvec[row] = acc;
}

// dK, dV for one key tile: block (key tile, head, sequence), loops over the
// query tiles that see it (diagonal..end). Works on transposed scores
// S^T[key][query]. Shared: Ks, Qs (kTile, ld(D)), Vs, dOs (kTile, ld(dv)),
// Ps, dSs (kTile, kLdP), lse_s, dvec_s (kTile).
// Writes dkv (+=, content and value parts) and dkr_part (=, this head's share
// of dk_rope, summed over heads later).
template <int NCK, int NCV>
__global__ void __launch_bounds__(kThreads) MlaBackwardDkvKernel(float* __restrict__ dkv,           // (N, H, dh+dv) +=
                                                                 float* __restrict__ dkr_part,      // (N, H, dr) =
                                                                 const float* __restrict__ dout,    // (N, H, dv)
                                                                 const float* __restrict__ lse,     // (N, H)
                                                                 const float* __restrict__ dvec,    // (N, H)
                                                                 const float* __restrict__ q,       // (N, H, dh+dr)
                                                                 const float* __restrict__ kv,      // (N, H, dh+dv)
                                                                 const float* __restrict__ k_rope,  // (N, dr)
                                                                 MlaShape s) {
  extern __shared__ float smem[];
  const int D = s.dh + s.dr, ldq = Ld(D), ldv = Ld(s.dv);
  float* Ks = smem;
  float* Qs = Ks + kTile * ldq;
  float* Vs = Qs + kTile * ldq;
  float* dOs = Vs + kTile * ldv;
  float* Ps = dOs + kTile * ldv;
  float* dSs = Ps + kTile * kLdP;
  float* lse_s = dSs + kTile * kLdP;
  float* dvec_s = lse_s + kTile;
  const int h = blockIdx.y;
  const int k0 = blockIdx.x * kTile;  // low tiles see the most queries: they start first
  const int64_t seq0 = static_cast<int64_t>(blockIdx.z) * s.T;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int k_valid = min(kTile, s.T - k0);
  LoadKeys(Ks, ldq, kv, k_rope, seq0 + k0, h, s, k_valid);
  LoadValues(Vs, ldv, kv, seq0 + k0, h, s, k_valid);

  float dk[kR][NCK], dv[kR][NCV];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int c = 0; c < NCK; ++c) dk[r][c] = 0.f;
#pragma unroll
    for (int c = 0; c < NCV; ++c) dv[r][c] = 0.f;
  }

  for (int q0 = k0; q0 < s.T; q0 += kTile) {  // kTile divides k0: tiles align
    const int q_valid = min(kTile, s.T - q0);
    __syncthreads();  // the previous tile's products are done with Qs, dOs, Ps, dSs
    LoadTile(Qs, ldq, q + ((seq0 + q0) * s.H + h) * D, static_cast<int64_t>(s.H) * D, D, q_valid);
    LoadTile(dOs, ldv, dout + ((seq0 + q0) * s.H + h) * s.dv, static_cast<int64_t>(s.H) * s.dv, s.dv, q_valid);
    if (threadIdx.x < kTile) {
      const bool ok = static_cast<int>(threadIdx.x) < q_valid;
      const int64_t row = (seq0 + q0 + threadIdx.x) * s.H + h;
      lse_s[threadIdx.x] = ok ? lse[row] : 0.f;
      dvec_s[threadIdx.x] = ok ? dvec[row] : 0.f;
    }
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for this thread's 4 x 4 entries.
    float st[kR][kR] = {}, dpt[kR][kR] = {};
    for (int d = 0; d < D; ++d) {
      float a[kR], b[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = Ks[(ty + 16 * r) * ldq + d];
#pragma unroll
      for (int c = 0; c < kR; ++c) b[c] = Qs[(tx + 16 * c) * ldq + d];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < kR; ++c) st[r][c] = fmaf(a[r], b[c], st[r][c]);
    }
    for (int d = 0; d < s.dv; ++d) {
      float a[kR], b[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = Vs[(ty + 16 * r) * ldv + d];
#pragma unroll
      for (int c = 0; c < kR; ++c) b[c] = dOs[(tx + 16 * c) * ldv + d];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < kR; ++c) dpt[r][c] = fmaf(a[r], b[c], dpt[r][c]);
    }

    // P = exp(S - lse), dS = P (dP - D_i); masked entries are exactly 0.
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int j = k0 + ty + 16 * r;
#pragma unroll
      for (int c = 0; c < kR; ++c) {
        const int ci = tx + 16 * c, i = q0 + ci;
        float p = 0.f, ds = 0.f;
        if (i < s.T && j <= i) {
          p = expf(s.scale * st[r][c] - lse_s[ci]);
          ds = p * (dpt[r][c] - dvec_s[ci]);
        }
        Ps[(ty + 16 * r) * kLdP + ci] = p;
        dSs[(ty + 16 * r) * kLdP + ci] = ds;
      }
    }
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q (the scale is applied once at the end).
    for (int i = 0; i < q_valid; ++i) {
      float p[kR], g[kR], bq[NCK], bo[NCV];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        p[r] = Ps[(ty + 16 * r) * kLdP + i];
        g[r] = dSs[(ty + 16 * r) * kLdP + i];
      }
#pragma unroll
      for (int c = 0; c < NCK; ++c) bq[c] = Qs[i * ldq + min(tx + 16 * c, D - 1)];
#pragma unroll
      for (int c = 0; c < NCV; ++c) bo[c] = dOs[i * ldv + min(tx + 16 * c, s.dv - 1)];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int c = 0; c < NCK; ++c) dk[r][c] = fmaf(g[r], bq[c], dk[r][c]);
#pragma unroll
        for (int c = 0; c < NCV; ++c) dv[r][c] = fmaf(p[r], bo[c], dv[r][c]);
      }
    }
  }

  const int64_t kvs = s.dh + s.dv;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int j = k0 + ty + 16 * r;
    if (j >= s.T) continue;
    const int64_t row = (seq0 + j) * s.H + h;
#pragma unroll
    for (int c = 0; c < NCK; ++c) {
      const int col = tx + 16 * c;
      if (col < s.dh) {
        dkv[row * kvs + col] += s.scale * dk[r][c];
      } else if (col < D) {
        dkr_part[row * s.dr + (col - s.dh)] = s.scale * dk[r][c];
      }
    }
#pragma unroll
    for (int c = 0; c < NCV; ++c) {
      const int col = tx + 16 * c;
      if (col < s.dv) dkv[row * kvs + s.dh + col] += dv[r][c];
    }
  }
}

// dQ for one query tile: block (query tile, head, sequence), loops over key
// tiles 0..diagonal. Shared: Qs, Ks (kTile, ld(D)), dOs, Vs (kTile, ld(dv)),
// dSs (kTile, kLdP).
template <int NCK>
__global__ void __launch_bounds__(kThreads) MlaBackwardDqKernel(float* __restrict__ dq,            // (N, H, dh+dr) +=
                                                                const float* __restrict__ dout,    // (N, H, dv)
                                                                const float* __restrict__ lse,     // (N, H)
                                                                const float* __restrict__ dvec,    // (N, H)
                                                                const float* __restrict__ q,       // (N, H, dh+dr)
                                                                const float* __restrict__ kv,      // (N, H, dh+dv)
                                                                const float* __restrict__ k_rope,  // (N, dr)
                                                                MlaShape s) {
  extern __shared__ float smem[];
  const int D = s.dh + s.dr, ldq = Ld(D), ldv = Ld(s.dv);
  float* Qs = smem;
  float* Ks = Qs + kTile * ldq;
  float* dOs = Ks + kTile * ldq;
  float* Vs = dOs + kTile * ldv;
  float* dSs = Vs + kTile * ldv;
  const int h = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;  // longest rows first
  const int64_t seq0 = static_cast<int64_t>(blockIdx.z) * s.T;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int q_valid = min(kTile, s.T - q0);
  LoadTile(Qs, ldq, q + ((seq0 + q0) * s.H + h) * D, static_cast<int64_t>(s.H) * D, D, q_valid);
  LoadTile(dOs, ldv, dout + ((seq0 + q0) * s.H + h) * s.dv, static_cast<int64_t>(s.H) * s.dv, s.dv, q_valid);
  float lse_r[kR], dvec_r[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int i = q0 + ty + 16 * r;
    const int64_t row = (seq0 + i) * s.H + h;
    lse_r[r] = i < s.T ? lse[row] : 0.f;
    dvec_r[r] = i < s.T ? dvec[row] : 0.f;
  }

  float acc[kR][NCK];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int c = 0; c < NCK; ++c) acc[r][c] = 0.f;

  const int k_end = min(s.T, q0 + kTile);
  for (int k0 = 0; k0 < k_end; k0 += kTile) {
    const int k_valid = min(kTile, s.T - k0);
    __syncthreads();  // the previous tile's dS K is done with Ks, dSs
    LoadKeys(Ks, ldq, kv, k_rope, seq0 + k0, h, s, k_valid);
    LoadValues(Vs, ldv, kv, seq0 + k0, h, s, k_valid);
    __syncthreads();

    // S = Q K^T and dP = dO V^T for this thread's 4 x 4 entries.
    float sc[kR][kR] = {}, dp[kR][kR] = {};
    for (int d = 0; d < D; ++d) {
      float a[kR], b[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = Qs[(ty + 16 * r) * ldq + d];
#pragma unroll
      for (int c = 0; c < kR; ++c) b[c] = Ks[(tx + 16 * c) * ldq + d];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < kR; ++c) sc[r][c] = fmaf(a[r], b[c], sc[r][c]);
    }
    for (int d = 0; d < s.dv; ++d) {
      float a[kR], b[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = dOs[(ty + 16 * r) * ldv + d];
#pragma unroll
      for (int c = 0; c < kR; ++c) b[c] = Vs[(tx + 16 * c) * ldv + d];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < kR; ++c) dp[r][c] = fmaf(a[r], b[c], dp[r][c]);
    }

#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int i = q0 + ty + 16 * r;
#pragma unroll
      for (int c = 0; c < kR; ++c) {
        const int j = k0 + tx + 16 * c;
        float ds = 0.f;
        if (i < s.T && j <= i) ds = expf(s.scale * sc[r][c] - lse_r[r]) * (dp[r][c] - dvec_r[r]);
        dSs[(ty + 16 * r) * kLdP + tx + 16 * c] = ds;
      }
    }
    __syncthreads();

    // dQ += dS K.
    for (int j = 0; j < k_valid; ++j) {
      float a[kR], b[NCK];
#pragma unroll
      for (int r = 0; r < kR; ++r) a[r] = dSs[(ty + 16 * r) * kLdP + j];
#pragma unroll
      for (int c = 0; c < NCK; ++c) b[c] = Ks[j * ldq + min(tx + 16 * c, D - 1)];
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int c = 0; c < NCK; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
  }

#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int i = q0 + ty + 16 * r;
    if (i >= s.T) continue;
    const int64_t row = (seq0 + i) * s.H + h;
#pragma unroll
    for (int c = 0; c < NCK; ++c) {
      const int col = tx + 16 * c;
      if (col < D) dq[row * D + col] += s.scale * acc[r][c];
    }
  }
}

// dk_rope[n] += sum over heads h (in order) of part[n, h].
__global__ void SumHeadsKernel(float* __restrict__ dk_rope,     // (N, dr) +=
                               const float* __restrict__ part,  // (N, H, dr)
                               int64_t N, int H, int dr) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * dr) return;
  const int64_t n = idx / dr;
  const int c = static_cast<int>(idx - n * dr);
  float g = 0.f;
  for (int h = 0; h < H; ++h) g += part[(n * H + h) * dr + c];
  dk_rope[idx] += g;
}

// ---- host side -------------------------------------------------------------------

// Calls f(std::integral_constant<int, NC>) with the register tier for a
// width: NC * 16 >= cols. False when cols > kMaxWidth. kWith12: offer the
// 12-wide tier (else (128, 192] takes 16: fewer instantiations).
template <bool kWith12, typename F>
bool DispatchWidth(int cols, F&& f) {
  if (cols <= 32) {
    f(std::integral_constant<int, 2>{});
  } else if (cols <= 64) {
    f(std::integral_constant<int, 4>{});
  } else if (cols <= 128) {
    f(std::integral_constant<int, 8>{});
  } else if (cols <= 192) {
    if constexpr (kWith12) {
      f(std::integral_constant<int, 12>{});
    } else {
      f(std::integral_constant<int, 16>{});
    }
  } else if (cols <= kMaxWidth) {
    f(std::integral_constant<int, 16>{});
  } else {
    return false;
  }
  return true;
}

bool IsCudaF32(const Tensor& t) { return t.defined() && t.device() == DeviceKind::kCuda && t.dtype() == DType::kF32; }

// Checks the operands and derives the sizes, as the CPU's GetDims; false
// (after Fail) when they do not fit this implementation.
bool GetShape(CudaBackend& be, const char* op, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kv,
              const Tensor& k_rope, int seq_len, int head_dim, double scale, MlaShape* s, int64_t* N) {
  if (!RequireF32(be, op, {&out, &lse, &q, &kv, &k_rope})) return false;
  *N = k_rope.rows();
  const int64_t dr = k_rope.cols();
  const int64_t H = *N == 0 ? 0 : lse.numel() / *N;
  const int64_t dv = (*N * H == 0) ? 0 : kv.numel() / (*N * H) - head_dim;
  if (seq_len <= 0 || *N % seq_len != 0 || head_dim < 0 || dv < 1 || H * *N != lse.numel() ||
      q.numel() != *N * H * (head_dim + dr) || kv.numel() != *N * H * (head_dim + dv) || out.numel() != *N * H * dv) {
    be.Fail(op, "inconsistent shapes: q " + q.ShapeString() + ", kv " + kv.ShapeString() + ", k_rope " +
                    k_rope.ShapeString() + ", out " + out.ShapeString() + ", lse " + lse.ShapeString() + ", seq_len " +
                    std::to_string(seq_len) + ", head_dim " + std::to_string(head_dim));
    return false;
  }
  if (head_dim + dr < 1 || head_dim + dr > kMaxWidth || dv > kMaxWidth) {
    be.Fail(op, "unsupported head widths dh+dr = " + std::to_string(head_dim + dr) + ", dv = " + std::to_string(dv) +
                    " (at most " + std::to_string(kMaxWidth) + " each)");
    return false;
  }
  const int64_t B = *N / seq_len;
  if (H > 65535 || B > 65535) {
    be.Fail(op, "grid too large: " + std::to_string(H) + " heads x " + std::to_string(B) + " sequences (max 65535)");
    return false;
  }
  *s = MlaShape{
      seq_len, static_cast<int>(H), head_dim, static_cast<int>(dr), static_cast<int>(dv), static_cast<float>(scale)};
  return true;
}

// Sets the dynamic shared memory of `kernel` to `floats` floats; false (after
// Fail) when the device cannot give that much to one block.
template <typename Kernel>
bool PrepareSmem(CudaBackend& be, const char* op, Kernel kernel, int64_t floats) {
  const int64_t bytes = floats * static_cast<int64_t>(sizeof(float));
  int dev = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) {
    be.Fail(op, std::string("device query: ") + cudaGetErrorString(err));
    return false;
  }
  if (bytes > max_optin) {
    be.Fail(op, "head widths need " + std::to_string(bytes) + " bytes of shared memory per block; the device allows " +
                    std::to_string(max_optin));
    return false;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    be.Fail(op, std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(err));
    return false;
  }
  return true;
}

void LaunchRope(CudaBackend& be, const char* op, Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta,
                double sign) {
  if (be.failed()) return;
  if (!IsCudaF32(x) || x.ndim() < 2) {
    be.Fail(op, "x must be an F32 CUDA tensor of rank >= 2, got " + x.ShapeString());
    return;
  }
  const int64_t N = x.dim(0), Dh = x.cols();
  const int64_t H = (N == 0 || Dh == 0) ? 0 : x.numel() / (N * Dh);
  if (rot_dim % 2 != 0 || rot_offset < 0 || rot_offset + rot_dim > Dh || seq_len <= 0 || N % seq_len != 0) {
    be.Fail(op, "bad rotation: x " + x.ShapeString() + ", rot_offset " + std::to_string(rot_offset) + ", rot_dim " +
                    std::to_string(rot_dim) + ", seq_len " + std::to_string(seq_len));
    return;
  }
  const int64_t work = N * (rot_dim / 2);
  if (work == 0 || H == 0) return;
  RopeKernel<<<Blocks(work, 256), 256, 0, be.stream()>>>(x.data<float>(), N, H, Dh, rot_offset, rot_dim, seq_len, theta,
                                                         sign);
  LaunchOk(be, op, "RopeKernel");
}

}  // namespace

void CudaBackend::RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) {
  LaunchRope(*this, "RopeForward", x, rot_offset, rot_dim, seq_len, theta, +1.0);
}

void CudaBackend::RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) {
  LaunchRope(*this, "RopeBackward", dx, rot_offset, rot_dim, seq_len, theta, -1.0);
}

void CudaBackend::MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope,
                                      int seq_len, int head_dim, double scale) {
  const char* op = "MlaAttentionForward";
  if (failed()) return;
  MlaShape s{};
  int64_t N = 0;
  if (!GetShape(*this, op, out, lse, q, kv, k_rope, seq_len, head_dim, scale, &s, &N)) return;
  if (N == 0 || s.H == 0) return;
  const int D = s.dh + s.dr;
  const int64_t smem = 2LL * kTile * Ld(D) + kTile * Ld(s.dv) + kTile * kLdP;
  const dim3 grid(Blocks(s.T, kTile), s.H, static_cast<unsigned>(N / s.T));
  DispatchWidth<true>(s.dv, [&](auto ncv) {
    constexpr int NCV = decltype(ncv)::value;
    if (!PrepareSmem(*this, op, MlaForwardKernel<NCV>, smem)) return;
    MlaForwardKernel<NCV><<<grid, kThreads, smem * sizeof(float), stream()>>>(
        out.data<float>(), lse.data<float>(), q.data<float>(), kv.data<float>(), k_rope.data<float>(), s);
    LaunchOk(*this, op, "MlaForwardKernel");
  });
}

void CudaBackend::MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout, const Tensor& out,
                                       const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope,
                                       int seq_len, int head_dim, double scale) {
  const char* op = "MlaAttentionBackward";
  if (failed()) return;
  MlaShape s{};
  int64_t N = 0;
  if (!GetShape(*this, op, out, lse, q, kv, k_rope, seq_len, head_dim, scale, &s, &N)) return;
  if (!RequireF32(*this, op, {&dq, &dkv, &dk_rope, &dout})) return;
  if (dq.numel() != q.numel() || dkv.numel() != kv.numel() || dk_rope.numel() != k_rope.numel() ||
      dout.numel() != out.numel()) {
    Fail(op, "gradient shapes differ from their operands");
    return;
  }
  if (N == 0 || s.H == 0) return;
  const int D = s.dh + s.dr;
  const int64_t rows = N * s.H;

  // Scratch: dvec [N, H], then the per-head dk_rope partials [N, H, dr].
  float* ws = static_cast<float*>(Workspace(static_cast<size_t>(rows * (1 + s.dr)) * sizeof(float)));
  if (ws == nullptr || failed()) return;
  float* dvec = ws;
  float* dkr_part = ws + rows;

  RowDotKernel<<<Blocks(rows * 32, 256), 256, 0, stream()>>>(dvec, dout.data<float>(), out.data<float>(), rows, s.dv);
  if (!LaunchOk(*this, op, "RowDotKernel")) return;

  const dim3 grid(Blocks(s.T, kTile), s.H, static_cast<unsigned>(N / s.T));
  const int64_t smem_dkv = 2LL * kTile * Ld(D) + 2LL * kTile * Ld(s.dv) + 2LL * kTile * kLdP + 2 * kTile;
  const int64_t smem_dq = 2LL * kTile * Ld(D) + 2LL * kTile * Ld(s.dv) + kTile * kLdP;
  bool launched = true;
  // dK/dV registers: 4 * (NCK + NCV) per thread, so no 12-wide tier for dv
  // (fewer instantiations; dv in (128, 192] takes the 16 tier).
  DispatchWidth<true>(D, [&](auto nck) {
    constexpr int NCK = decltype(nck)::value;
    DispatchWidth<false>(s.dv, [&](auto ncv) {
      constexpr int NCV = decltype(ncv)::value;
      if (!PrepareSmem(*this, op, MlaBackwardDkvKernel<NCK, NCV>, smem_dkv)) {
        launched = false;
        return;
      }
      MlaBackwardDkvKernel<NCK, NCV><<<grid, kThreads, smem_dkv * sizeof(float), stream()>>>(
          dkv.data<float>(), dkr_part, dout.data<float>(), lse.data<float>(), dvec, q.data<float>(), kv.data<float>(),
          k_rope.data<float>(), s);
      launched = LaunchOk(*this, op, "MlaBackwardDkvKernel");
    });
    if (!launched) return;
    if (!PrepareSmem(*this, op, MlaBackwardDqKernel<NCK>, smem_dq)) {
      launched = false;
      return;
    }
    MlaBackwardDqKernel<NCK><<<grid, kThreads, smem_dq * sizeof(float), stream()>>>(
        dq.data<float>(), dout.data<float>(), lse.data<float>(), dvec, q.data<float>(), kv.data<float>(),
        k_rope.data<float>(), s);
    launched = LaunchOk(*this, op, "MlaBackwardDqKernel");
  });
  if (!launched || s.dr == 0) return;

  SumHeadsKernel<<<Blocks(N * s.dr, 256), 256, 0, stream()>>>(dk_rope.data<float>(), dkr_part, N, s.H, s.dr);
  LaunchOk(*this, op, "SumHeadsKernel");
}

}  // namespace troupe
