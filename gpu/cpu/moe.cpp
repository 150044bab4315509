// Mixture-of-experts kernels of the CPU reference backend (BRIEF §1, MoE):
//   MoeRoute / MoeRouteBackward         group-limited top-K on (s + b), sigmoid gates from s
//   MoePermute / MoePermuteBackward     stable counting sort of assignments into expert order
//   MoeCombine / MoeCombineBackward     gated sum of expert outputs back to tokens
//   MoeBalanceLoss / ...Backward        sequence-wise complementary balance loss
//   MoeExpertLoad                       tokens per expert (feeds the aux-loss-free bias rule)
// Contracts are in gpu/backend.h. Every loop that runs in parallel writes
// outputs owned by one token (or one sequence) and reduces in a fixed order,
// so results are bitwise the same for any OpenMP thread count.
//
// Arithmetic: the selection values (s + b) and the group scores are computed
// in the operand dtype T (so a CUDA kernel in the same dtype picks the same
// experts); every sum that produces a gate, a gradient or a loss is
// accumulated in double and rounded to T once.
#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/cpu/dispatch.h"

namespace troupe {
namespace {

// Index of the largest v[i], i in [begin, end) with !blocked[i]; ties go to the
// lower index (the scan is ascending and only a strictly larger value wins).
// -1 when every index is blocked.
template <typename V>
int ArgMaxFree(const V* v, const uint8_t* blocked, int begin, int end) {
  int best = -1;
  for (int i = begin; i < end; ++i) {
    if (blocked[i]) continue;
    if (best < 0 || v[i] > v[best]) best = i;
  }
  return best;
}

// Per-thread working memory of the router.
template <typename T>
struct RouteScratch {
  explicit RouteScratch(int n_experts, int n_group)
      : sel(n_experts), blocked(n_experts), chosen(n_experts), group_score(n_group), group_kept(n_group) {}
  std::vector<T> sel;              // (E) s + b
  std::vector<uint8_t> blocked;    // (E) not available / already picked
  std::vector<uint8_t> chosen;     // (E) in this token's top K
  std::vector<T> group_score;      // (G)
  std::vector<uint8_t> group_kept; // (G)
};

// Routes one token: idx (K) ascending expert ids, gate (K).
template <typename T>
void RouteToken(int32_t* idx, T* gate, const T* s, const T* b, int E, const RoutingSpec& spec,
                RouteScratch<T>& w) {
  const int K = spec.top_k, G = spec.n_group, M = spec.topk_group;
  const int group_size = E / G;
  for (int e = 0; e < E; ++e) w.sel[e] = s[e] + b[e];
  std::fill(w.blocked.begin(), w.blocked.end(), uint8_t{0});
  std::fill(w.chosen.begin(), w.chosen.end(), uint8_t{0});

  // 1. Groups (skipped when every group may be kept): score = sum of the top
  //    K/M selection values inside the group, summed largest first; keep the M
  //    best groups (ties -> lower group index); experts elsewhere are blocked.
  if (M < G) {
    const int per_group = std::min(group_size, std::max(1, K / M));
    for (int g = 0; g < G; ++g) {
      T sum = 0;
      for (int r = 0; r < per_group; ++r) {
        const int e = ArgMaxFree(w.sel.data(), w.blocked.data(), g * group_size, (g + 1) * group_size);
        sum += w.sel[e];
        w.blocked[e] = 1;
      }
      w.group_score[g] = sum;
    }
    std::fill(w.group_kept.begin(), w.group_kept.end(), uint8_t{0});
    for (int m = 0; m < M; ++m) {
      const int g = ArgMaxFree(w.group_score.data(), w.group_kept.data(), 0, G);
      w.group_kept[g] = 1;
    }
    for (int e = 0; e < E; ++e) w.blocked[e] = !w.group_kept[e / group_size];
  }

  // 2. Top K by selection value among the allowed experts (ties -> lower id).
  for (int k = 0; k < K; ++k) {
    const int e = ArgMaxFree(w.sel.data(), w.blocked.data(), 0, E);
    assert(e >= 0 && "top_k exceeds the experts of the kept groups");
    if (e < 0) break;
    w.blocked[e] = 1;
    w.chosen[e] = 1;
  }

  // 3. Emit ascending by expert id; gates from the scores only (bias never enters).
  int k = 0;
  double denom = 0.0;
  for (int e = 0; e < E && k < K; ++e) {
    if (!w.chosen[e]) continue;
    idx[k++] = e;
    denom += static_cast<double>(s[e]);
  }
  for (int j = 0; j < k; ++j) {
    const double sj = static_cast<double>(s[idx[j]]);
    gate[j] = static_cast<T>(spec.normalize ? spec.scale * sj / denom : spec.scale * sj);
  }
}

// Tokens of row n of topk_idx (K entries) counted once per distinct expert:
// true when idx[k] did not already appear at an earlier k.
inline bool FirstOccurrence(const int32_t* idx, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    if (idx[j] == idx[k]) return false;
  }
  return true;
}

// counts (B, E): per sequence of seq_len tokens, how many tokens picked each expert.
std::vector<int32_t> SequenceCounts(const Tensor& topk_idx, int64_t E, int64_t seq_len) {
  const int64_t N = topk_idx.rows(), K = topk_idx.cols(), B = N / seq_len;
  const int32_t* idx = topk_idx.data<int32_t>();
  std::vector<int32_t> counts(static_cast<size_t>(B * E), 0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    int32_t* c = counts.data() + b * E;
    for (int64_t n = b * seq_len; n < (b + 1) * seq_len; ++n) {
      const int32_t* row = idx + n * K;
      for (int64_t k = 0; k < K; ++k) {
        if (FirstOccurrence(row, k)) ++c[row[k]];
      }
    }
  }
  return counts;
}

}  // namespace

void CpuBackend::MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias,
                          const RoutingSpec& spec) {
  const int64_t N = scores.rows();
  const int E = static_cast<int>(scores.cols());
  const int K = spec.top_k, G = spec.n_group;
  [[maybe_unused]] const int M = spec.topk_group;
  assert(bias.numel() == E && bias.dtype() == scores.dtype() && topk_gate.dtype() == scores.dtype());
  assert(topk_idx.dtype() == DType::kI32 && topk_idx.rows() == N && topk_idx.cols() == K);
  assert(topk_gate.rows() == N && topk_gate.cols() == K);
  assert(G >= 1 && E % G == 0 && M >= 1 && M <= G && K >= 1 && K <= M * (E / G));
  int32_t* idx = topk_idx.data<int32_t>();  // (N, K)
  cpu::DispatchFloat(scores.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* s = scores.data<T>();  // (N, E)
    const T* b = bias.data<T>();    // (E)
    T* gate = topk_gate.data<T>();  // (N, K)
#pragma omp parallel
    {
      RouteScratch<T> work(E, G);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) RouteToken(idx + n * K, gate + n * K, s + n * E, b, E, spec, work);
    }
  });
}

// g_i = c s_i / S, S = sum_{j in TopK} s_j  =>  dL/ds_j = c (dg_j / S - sum_i dg_i s_i / S^2);
// without normalisation dL/ds_j = c dg_j. Only the K picked columns receive gradient.
void CpuBackend::MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx,
                                  const RoutingSpec& spec) {
  const int64_t N = scores.rows(), E = scores.cols(), K = topk_idx.cols();
  assert(dscores.rows() == N && dscores.cols() == E && dgate.rows() == N && dgate.cols() == K);
  const int32_t* idx = topk_idx.data<int32_t>();  // (N, K)
  cpu::DispatchFloat(scores.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* s = scores.data<T>();  // (N, E)
    const T* dg = dgate.data<T>();  // (N, K)
    T* ds = dscores.data<T>();      // (N, E)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const int32_t* row = idx + n * K;
      const T* sn = s + n * E;
      const T* dgn = dg + n * K;
      T* dsn = ds + n * E;
      if (!spec.normalize) {
        for (int64_t k = 0; k < K; ++k) dsn[row[k]] = static_cast<T>(dsn[row[k]] + spec.scale * dgn[k]);
        continue;
      }
      double denom = 0.0, dot = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        denom += static_cast<double>(sn[row[k]]);
        dot += static_cast<double>(dgn[k]) * static_cast<double>(sn[row[k]]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const double g = spec.scale * (static_cast<double>(dgn[k]) / denom - dot / (denom * denom));
        dsn[row[k]] = static_cast<T>(dsn[row[k]] + g);
      }
    }
  });
}

void CpuBackend::MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx,
                            int n_experts) {
  const int64_t N = topk_idx.rows(), K = topk_idx.cols(), D = x.cols();
  assert(x.rows() == N && x_sorted.rows() == N * K && x_sorted.cols() == D && x_sorted.dtype() == x.dtype());
  assert(offsets.dtype() == DType::kI32 && offsets.numel() == n_experts + 1);
  assert(slot.dtype() == DType::kI32 && slot.numel() == N * K);
  const int32_t* idx = topk_idx.data<int32_t>();  // (N, K)
  int32_t* off = offsets.data<int32_t>();         // (E + 1)
  int32_t* sl = slot.data<int32_t>();             // (N, K)

  // Counting sort; the sequential (n, k) scan makes it stable: within an
  // expert, assignments keep token order, then k order.
  std::fill(off, off + n_experts + 1, 0);
  for (int64_t i = 0; i < N * K; ++i) {
    assert(idx[i] >= 0 && idx[i] < n_experts);
    ++off[idx[i] + 1];
  }
  for (int e = 0; e < n_experts; ++e) off[e + 1] += off[e];
  std::vector<int32_t> cursor(off, off + n_experts);
  for (int64_t i = 0; i < N * K; ++i) sl[i] = cursor[idx[i]]++;

  const size_t row_bytes = static_cast<size_t>(D) * DTypeSize(x.dtype());
  const char* src = static_cast<const char*>(x.raw());  // (N, D)
  char* dst = static_cast<char*>(x_sorted.raw());      // (N*K, D)
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(dst + static_cast<size_t>(sl[n * K + k]) * row_bytes, src + static_cast<size_t>(n) * row_bytes,
                  row_bytes);
    }
  }
}

void CpuBackend::MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) {
  const int64_t N = slot.rows(), K = slot.cols(), D = dx.cols();
  assert(dx.rows() == N && dx_sorted.rows() == N * K && dx_sorted.cols() == D);
  const int32_t* sl = slot.data<int32_t>();  // (N, K)
  cpu::DispatchFloat(dx.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* dxs = dx_sorted.data<T>();  // (N*K, D)
    T* d = dx.data<T>();                 // (N, D)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* dn = d + n * D;
      for (int64_t k = 0; k < K; ++k) {
        const T* src = dxs + static_cast<int64_t>(sl[n * K + k]) * D;
        for (int64_t c = 0; c < D; ++c) dn[c] += src[c];
      }
    }
  });
}

void CpuBackend::MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  const int64_t N = slot.rows(), K = slot.cols(), D = y.cols();
  assert(y.rows() == N && y_sorted.rows() == N * K && y_sorted.cols() == D && gate.numel() == N * K);
  const int32_t* sl = slot.data<int32_t>();  // (N, K)
  cpu::DispatchFloat(y.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* ys = y_sorted.data<T>();  // (N*K, D)
    const T* g = gate.data<T>();       // (N, K)
    T* out = y.data<T>();              // (N, D)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* yn = out + n * D;
      for (int64_t k = 0; k < K; ++k) {
        const T gk = g[n * K + k];
        const T* src = ys + static_cast<int64_t>(sl[n * K + k]) * D;
        for (int64_t c = 0; c < D; ++c) yn[c] += gk * src[c];
      }
    }
  });
}

void CpuBackend::MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted,
                                    const Tensor& gate, const Tensor& slot) {
  const int64_t N = slot.rows(), K = slot.cols(), D = dy.cols();
  assert(dy.rows() == N && y_sorted.rows() == N * K && dy_sorted.rows() == N * K && dgate.numel() == N * K);
  const int32_t* sl = slot.data<int32_t>();  // (N, K)
  cpu::DispatchFloat(dy.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* d = dy.data<T>();         // (N, D)
    const T* ys = y_sorted.data<T>();  // (N*K, D)
    const T* g = gate.data<T>();       // (N, K)
    T* dys = dy_sorted.data<T>();      // (N*K, D)
    T* dg = dgate.data<T>();           // (N, K)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* dn = d + n * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = sl[n * K + k];
        const T gk = g[n * K + k];
        const T* yr = ys + r * D;
        T* dr = dys + r * D;
        double dot = 0.0;
        for (int64_t c = 0; c < D; ++c) {
          dr[c] = gk * dn[c];
          dot += static_cast<double>(dn[c]) * static_cast<double>(yr[c]);
        }
        dg[n * K + k] = static_cast<T>(dot);
      }
    }
  });
}

// Per sequence: loss = alpha * sum_i f_i P_i, f_i = E/(K T) c_i, P_i = (1/T) sum_t s_it / S_t.
void CpuBackend::MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                                double alpha) {
  const int64_t N = scores.rows(), E = scores.cols(), K = topk_idx.cols(), T_len = seq_len;
  assert(seq_len > 0 && N % seq_len == 0 && topk_idx.rows() == N && loss.numel() == N / seq_len);
  const int64_t B = N / T_len;
  const std::vector<int32_t> counts = SequenceCounts(topk_idx, E, T_len);  // (B, E)
  const double f_scale = static_cast<double>(E) / (static_cast<double>(K) * static_cast<double>(T_len));
  cpu::DispatchFloat(scores.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* s = scores.data<T>();  // (N, E)
    T* out = loss.data<T>();        // (B)
#pragma omp parallel
    {
      std::vector<double> p(static_cast<size_t>(E));  // (E) sum_t s_it / S_t
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        std::fill(p.begin(), p.end(), 0.0);
        for (int64_t n = b * T_len; n < (b + 1) * T_len; ++n) {
          const T* sn = s + n * E;
          double denom = 0.0;
          for (int64_t j = 0; j < E; ++j) denom += static_cast<double>(sn[j]);
          for (int64_t i = 0; i < E; ++i) p[i] += static_cast<double>(sn[i]) / denom;
        }
        const int32_t* c = counts.data() + b * E;
        double sum = 0.0;
        for (int64_t i = 0; i < E; ++i) sum += (f_scale * c[i]) * (p[i] / static_cast<double>(T_len));
        out[b] = static_cast<T>(alpha * sum);
      }
    }
  });
}

// With r_t = sum_i c_i s_it / S_t:  d loss / d s_jt = alpha E/(K T^2) (c_j - r_t) / S_t.
void CpuBackend::MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                                        double alpha, double dloss) {
  const int64_t N = scores.rows(), E = scores.cols(), K = topk_idx.cols(), T_len = seq_len;
  assert(seq_len > 0 && N % seq_len == 0 && topk_idx.rows() == N && dscores.numel() == N * E);
  const std::vector<int32_t> counts = SequenceCounts(topk_idx, E, T_len);  // (B, E)
  const double coef = dloss * alpha * static_cast<double>(E) /
                      (static_cast<double>(K) * static_cast<double>(T_len) * static_cast<double>(T_len));
  cpu::DispatchFloat(scores.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* s = scores.data<T>();  // (N, E)
    T* ds = dscores.data<T>();      // (N, E)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* sn = s + n * E;
      T* dsn = ds + n * E;
      const int32_t* c = counts.data() + (n / T_len) * E;
      double denom = 0.0, weighted = 0.0;
      for (int64_t j = 0; j < E; ++j) {
        denom += static_cast<double>(sn[j]);
        weighted += c[j] * static_cast<double>(sn[j]);
      }
      const double r = weighted / denom;
      for (int64_t j = 0; j < E; ++j) dsn[j] = static_cast<T>(dsn[j] + coef * (c[j] - r) / denom);
    }
  });
}

void CpuBackend::MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) {
  assert(counts.dtype() == DType::kI32 && counts.numel() == n_experts && topk_idx.dtype() == DType::kI32);
  const int64_t total = topk_idx.numel();
  const int32_t* idx = topk_idx.data<int32_t>();  // (N, K)
  int32_t* c = counts.data<int32_t>();            // (E)
  // Sequential: a histogram has no per-token independent output, and N*K
  // increments cost nothing next to the experts themselves.
  std::fill(c, c + n_experts, 0);
  for (int64_t i = 0; i < total; ++i) {
    assert(idx[i] >= 0 && idx[i] < n_experts);
    ++c[idx[i]];
  }
}

}  // namespace troupe
