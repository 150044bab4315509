// CPU reference for MLA attention with decoupled RoPE (BRIEF §1): RoPE and a
// flash-style causal attention, forward/backward pairs.
//
// Layout (why): the model produces q, kv and k_rope with one matmul each, so
// per token the heads sit side by side and each head keeps its parts
// contiguous: q [N, H, dh+dr] = [q_c | q_r], kv [N, H, dh+dv] = [k_c | v].
// Attention reads those views in place instead of splitting them into
// separate tensors. k_rope [N, dr] is one vector per token, shared by heads.
//
// Numerics: scores, softmax and every reduction run in double for both F32
// and F64 operands, and round once on store. The T x T matrix is never
// stored: forward keeps one row of scores (T values) per thread, backward
// recomputes p_ij = exp(score_ij - lse_i) from the saved lse.
//
// Determinism: forward tasks (token, head) write disjoint outputs. Backward
// tasks (sequence, head) write disjoint rows of dq and dkv; dk_rope, which
// every head feeds, gets per-head partials in scratch that are summed over
// heads in a fixed order afterwards. No result depends on the thread count.
#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/cpu/dispatch.h"

namespace troupe {
namespace {

// ---- RoPE -------------------------------------------------------------------

// Rotates pair (2j, 2j+1) of columns [rot_offset, rot_offset+rot_dim) of every
// head by sign * pos * theta^(-2j/rot_dim); sign = -1 is the inverse (the
// rotation is orthogonal, so the backward of y = R x is dx = R^T dy).
template <typename T>
void RopeRotate(T* x,  // (N, H, Dh), in place
                int64_t N, int64_t H, int64_t Dh, int rot_offset, int rot_dim, int seq_len, double theta,
                double sign) {
  const int half = rot_dim / 2;
  std::vector<double> inv_freq(half);  // (rot_dim/2,)
  for (int j = 0; j < half; ++j) inv_freq[j] = std::pow(theta, -2.0 * j / rot_dim);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const double pos = static_cast<double>(n % seq_len);
    for (int j = 0; j < half; ++j) {
      const double angle = pos * inv_freq[j];
      const double c = std::cos(angle), s = sign * std::sin(angle);
      for (int64_t h = 0; h < H; ++h) {
        T* p = x + (n * H + h) * Dh + rot_offset + 2 * j;
        const double x0 = p[0], x1 = p[1];
        p[0] = static_cast<T>(c * x0 - s * x1);
        p[1] = static_cast<T>(s * x0 + c * x1);
      }
    }
  }
}

void Rope(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta, double sign) {
  // [N, H, Dh]; a 2-D [N, Dh] (e.g. k_rope [N, dr]) is one head.
  assert(x.ndim() >= 2);
  const int64_t N = x.dim(0), Dh = x.cols();
  const int64_t H = (N == 0 || Dh == 0) ? 0 : x.numel() / (N * Dh);
  assert(rot_dim % 2 == 0 && rot_offset >= 0 && rot_offset + rot_dim <= Dh);
  assert(seq_len > 0 && N % seq_len == 0);
  cpu::DispatchFloat(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    RopeRotate<T>(x.data<T>(), N, H, Dh, rot_offset, rot_dim, seq_len, theta, sign);
  });
}

// ---- MLA attention ------------------------------------------------------------

// Sizes of one call, derived from the shapes (see Backend::MlaAttentionForward).
struct MlaDims {
  int64_t N, H, T, dh, dr, dv;
  int64_t qs() const { return dh + dr; }   // q head stride
  int64_t kvs() const { return dh + dv; }  // kv head stride
};

MlaDims GetDims(const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, const Tensor& out,
                int seq_len, int head_dim) {
  MlaDims d{};
  d.N = k_rope.rows();  // [N, dr] or [N, 1, dr]
  d.dr = k_rope.cols();
  d.T = seq_len;
  d.dh = head_dim;
  d.H = d.N == 0 ? 0 : lse.numel() / d.N;  // lse [N, H]
  d.dv = (d.N * d.H == 0) ? 0 : kv.numel() / (d.N * d.H) - d.dh;
  assert(seq_len > 0 && d.N % seq_len == 0);
  assert(q.numel() == d.N * d.H * d.qs());
  assert(kv.numel() == d.N * d.H * d.kvs());
  assert(out.numel() == d.N * d.H * d.dv);
  assert(q.dtype() == kv.dtype() && q.dtype() == k_rope.dtype() && q.dtype() == out.dtype() &&
         q.dtype() == lse.dtype());
  (void)q, (void)out;
  return d;
}

// score(i, j) = scale * (q_c,i . k_c,j + q_r,i . k_r,j), in double.
template <typename T>
double Score(const T* qi, const T* kvj, const T* krj, const MlaDims& d, double scale) {
  double s = 0.0;
  for (int64_t c = 0; c < d.dh; ++c) s += static_cast<double>(qi[c]) * kvj[c];
  for (int64_t c = 0; c < d.dr; ++c) s += static_cast<double>(qi[d.dh + c]) * krj[c];
  return scale * s;
}

template <typename T>
void MlaForward(T* out,           // (N, H, dv)
                T* lse,           // (N, H)
                const T* q,       // (N, H, dh+dr)
                const T* kv,      // (N, H, dh+dv)
                const T* k_rope,  // (N, dr)
                const MlaDims& d, double scale) {
  const int64_t tasks = d.N * d.H;
#pragma omp parallel
  {
    std::vector<double> s(d.T), acc(d.dv);  // one row of scores, one output row
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / d.H, h = task % d.H;
      const int64_t t = n % d.T, base = n - t;  // first token of this sequence
      const T* qi = q + (n * d.H + h) * d.qs();
      // Two passes over the row: max for a stable exp, then normalise.
      double m = -INFINITY;
      for (int64_t j = 0; j <= t; ++j) {
        const int64_t nj = base + j;
        s[j] = Score(qi, kv + (nj * d.H + h) * d.kvs(), k_rope + nj * d.dr, d, scale);
        m = std::max(m, s[j]);
      }
      double l = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j <= t; ++j) {
        const double p = std::exp(s[j] - m);
        l += p;
        const T* vj = kv + ((base + j) * d.H + h) * d.kvs() + d.dh;
        for (int64_t c = 0; c < d.dv; ++c) acc[c] += p * vj[c];
      }
      T* oi = out + (n * d.H + h) * d.dv;
      for (int64_t c = 0; c < d.dv; ++c) oi[c] = static_cast<T>(acc[c] / l);
      lse[n * d.H + h] = static_cast<T>(m + std::log(l));
    }
  }
}

// Flash-attention backward for one head: with p_ij = exp(s_ij - lse_i),
// D_i = dout_i . out_i and ds_ij = p_ij (dout_i . v_j - D_i):
//   dv_j += p_ij dout_i,  dq_i += scale ds_ij k_j,  dk_j += scale ds_ij q_i.
template <typename T>
void MlaBackward(T* dq,                // (N, H, dh+dr) +=
                 T* dkv,               // (N, H, dh+dv) +=
                 T* dk_rope,           // (N, dr) +=
                 const T* dout,        // (N, H, dv)
                 const T* out,         // (N, H, dv)
                 const T* lse,         // (N, H)
                 const T* q,           // (N, H, dh+dr)
                 const T* kv,          // (N, H, dh+dv)
                 const T* k_rope,      // (N, dr)
                 const MlaDims& d, double scale) {
  const int64_t B = d.N / d.T;
  std::vector<double> dkr_part(static_cast<size_t>(d.N * d.H * d.dr));  // (N, H, dr) per-head dk_rope
#pragma omp parallel
  {
    // Per-task accumulators in double; the sequence's dkv rows are summed over
    // all query rows i before one add into the output.
    std::vector<double> dq_i(d.qs());                      // (dh+dr,)
    std::vector<double> dkv_seq(d.T * d.kvs());            // (T, dh+dv)
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * d.H; ++task) {
      const int64_t b = task / d.H, h = task % d.H, base = b * d.T;
      std::fill(dkv_seq.begin(), dkv_seq.end(), 0.0);
      for (int64_t i = 0; i < d.T; ++i) {
        const int64_t ni = base + i;
        const T* qi = q + (ni * d.H + h) * d.qs();
        const T* doi = dout + (ni * d.H + h) * d.dv;
        const T* oi = out + (ni * d.H + h) * d.dv;
        const double lse_i = lse[ni * d.H + h];
        double D = 0.0;
        for (int64_t c = 0; c < d.dv; ++c) D += static_cast<double>(doi[c]) * oi[c];
        std::fill(dq_i.begin(), dq_i.end(), 0.0);
        for (int64_t j = 0; j <= i; ++j) {
          const int64_t nj = base + j;
          const T* kvj = kv + (nj * d.H + h) * d.kvs();
          const T* krj = k_rope + nj * d.dr;
          const double p = std::exp(Score(qi, kvj, krj, d, scale) - lse_i);
          double dp = 0.0;
          double* dkvj = &dkv_seq[j * d.kvs()];
          for (int64_t c = 0; c < d.dv; ++c) {
            dp += static_cast<double>(doi[c]) * kvj[d.dh + c];
            dkvj[d.dh + c] += p * doi[c];
          }
          const double ds = scale * p * (dp - D);
          for (int64_t c = 0; c < d.dh; ++c) {
            dq_i[c] += ds * kvj[c];
            dkvj[c] += ds * qi[c];
          }
          double* dkrj = &dkr_part[(nj * d.H + h) * d.dr];
          for (int64_t c = 0; c < d.dr; ++c) {
            dq_i[d.dh + c] += ds * krj[c];
            dkrj[c] += ds * qi[d.dh + c];
          }
        }
        T* dqi = dq + (ni * d.H + h) * d.qs();
        for (int64_t c = 0; c < d.qs(); ++c) dqi[c] = static_cast<T>(dqi[c] + dq_i[c]);
      }
      for (int64_t j = 0; j < d.T; ++j) {
        T* dkvj = dkv + ((base + j) * d.H + h) * d.kvs();
        for (int64_t c = 0; c < d.kvs(); ++c) dkvj[c] = static_cast<T>(dkvj[c] + dkv_seq[j * d.kvs() + c]);
      }
    }
    // dk_rope: sum the per-head partials in head order (fixed, thread-free).
#pragma omp for schedule(static)
    for (int64_t n = 0; n < d.N; ++n) {
      for (int64_t c = 0; c < d.dr; ++c) {
        double g = 0.0;
        for (int64_t h = 0; h < d.H; ++h) g += dkr_part[(n * d.H + h) * d.dr + c];
        dk_rope[n * d.dr + c] = static_cast<T>(dk_rope[n * d.dr + c] + g);
      }
    }
  }
}

}  // namespace

void CpuBackend::RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) {
  Rope(x, rot_offset, rot_dim, seq_len, theta, +1.0);
}

void CpuBackend::RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) {
  Rope(dx, rot_offset, rot_dim, seq_len, theta, -1.0);
}

void CpuBackend::MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv,
                                     const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  const MlaDims d = GetDims(lse, q, kv, k_rope, out, seq_len, head_dim);
  cpu::DispatchFloat(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    MlaForward<T>(out.data<T>(), lse.data<T>(), q.data<T>(), kv.data<T>(), k_rope.data<T>(), d, scale);
  });
}

void CpuBackend::MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout,
                                      const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kv,
                                      const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  const MlaDims d = GetDims(lse, q, kv, k_rope, out, seq_len, head_dim);
  assert(dq.numel() == q.numel() && dkv.numel() == kv.numel() && dk_rope.numel() == k_rope.numel());
  assert(dout.numel() == out.numel());
  cpu::DispatchFloat(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    MlaBackward<T>(dq.data<T>(), dkv.data<T>(), dk_rope.data<T>(), dout.data<T>(), out.data<T>(), lse.data<T>(),
                   q.data<T>(), kv.data<T>(), k_rope.data<T>(), d, scale);
  });
}

}  // namespace troupe
