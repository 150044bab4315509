// One transformer layer (BRIEF §1): pre-norm MLA, then a dense SwiGLU or a
// DeepSeekMoE FFN, each with a residual. Forward saves in LayerActs what
// backward needs; backward runs the forward's steps in exactly reverse order.
#pragma once

#include <vector>

#include "configs/config.h"
#include "gpu/backend.h"
#include "gpu/model/expert_exchange.h"
#include "gpu/model/params.h"
#include "gpu/model/weight_grads.h"

namespace troupe {

// Sizes of one forward: B sequences of T tokens, N = B * T.
struct BatchShape {
  int batch = 0;
  int seq_len = 0;
  int64_t tokens() const { return static_cast<int64_t>(batch) * seq_len; }
};

// Saved activations of one layer (shapes in comments; N tokens).
struct LayerActs {
  Tensor ln1, rstd1;             // [N, d], [N]
  Tensor cq_pre, cq, rstd_q;     // [N, d_cq] x2, [N]
  Tensor q;                      // [N, n_h, d_h + d_r], rotary part already rotated
  Tensor ckv_pre, ckv, rstd_kv;  // [N, d_c] x2, [N]
  Tensor k_rope;                 // [N, d_r], rotated
  Tensor kv;                     // [N, n_h, d_h + d_v]
  Tensor att, lse;               // [N, n_h, d_v], [N, n_h]
  Tensor h1;                     // [N, d]  residual after attention
  Tensor ln2, rstd2;             // [N, d], [N]
  Tensor ffn;                    // [N, d]  FFN output (before the residual add)
  // dense FFN
  Tensor gate_up, act;  // [N, 2F], [N, F]
  // MoE FFN
  Tensor router_logits, scores;    // [N, E]
  Tensor topk_idx, topk_gate;      // I32 [N, K], [N, K]
  Tensor x_sorted, offsets, slot;  // [N*K, d], I32 [E+1], I32 [N, K]
  Tensor e_gate_up, e_act, e_out;  // [N*K, 2F], [N*K, F], [N*K, d]
  Tensor s_gate_up, s_act;         // shared experts: [N, 2Fs], [N, Fs]
  Tensor balance;                  // [B] sequence-wise balance loss
  Tensor load;                     // I32 [E] tokens per expert
  // Expert parallelism (ep ranks): the rows this rank's experts received,
  // expert-major (all sources of expert 0, then expert 1, ...). e_gate_up
  // and e_act then hold these rows' activations. Capacity ep * N * K.
  Tensor x_recv, y_recv;             // [cap, d]
  Tensor offsets_local;              // I32 [E/ep + 1] over x_recv's rows
  std::vector<int64_t> send_counts;  // [ep * E/ep] rows sent to rank j for its expert e
  std::vector<int64_t> recv_counts;  // [ep * E/ep] rows received from rank j for expert e here
};

// Gradient temporaries, shared by all layers (they run one at a time).
struct LayerScratch {
  Tensor d_h1, d_ln2, d_ffn_hidden, d_gate_up;                  // [N,d], [N,d], [N,Fmax], [N,2Fmax]
  Tensor d_y_sorted, d_gate, d_e_act, d_e_gate_up, d_x_sorted;  // MoE
  Tensor d_scores, d_router_logits;                             // [N, E]
  Tensor d_y_recv, d_x_recv;                                    // expert parallelism: [ep N K, d]
  Tensor d_att, d_q, d_kv, d_k_rope;                            // attention
  Tensor d_ckv, d_ckv_pre, d_cq, d_cq_pre, d_ln1;               // projections
};

Status AllocateLayerActs(Backend& be, const ModelConfig& cfg, const LayerParams& p, BatchShape shape, DType dtype,
                         LayerActs& acts);
// `ep`: ranks the routed experts are split over (sizes the receive buffers).
Status AllocateLayerScratch(Backend& be, const ModelConfig& cfg, BatchShape shape, DType dtype, LayerScratch& s,
                            int ep = 1);

// out [N, d] = layer(x [N, d]). `out` must not alias `x`.
// MoE layers also fill a.balance (weighted by balance_alpha) and a.load.
// With `ep` (an expert-parallel group of more than one rank), the routed
// experts run where they live and token copies travel there and back.
void LayerForward(Backend& be, const ModelConfig& cfg, const LayerParams& p, LayerActs& a, BatchShape shape,
                  const Tensor& x, Tensor& out, double balance_alpha, ExpertExchange* ep = nullptr);
// The FFN half alone: a.ffn = FFN(a.ln2). Used by LayerForward and decoding.
void FfnForward(Backend& be, const ModelConfig& cfg, const LayerParams& p, LayerActs& a, BatchShape shape,
                double balance_alpha, ExpertExchange* ep = nullptr);
// d_x += d(out)/d(x) . d_out;  grads += d(out)/d(params) . d_out (+ the balance
// loss, weighted by balance_dloss = d total loss / d(sum of balance values)).
// With `defer`, the matrices' weight gradients go into the queue instead (a
// pipeline's W runs them later); norms' weight gradients are always now.
void LayerBackward(Backend& be, const ModelConfig& cfg, const LayerParams& p, LayerParams& grads, LayerActs& a,
                   LayerScratch& s, BatchShape shape, const Tensor& x, const Tensor& d_out, Tensor& d_x,
                   double balance_alpha, double balance_dloss, WeightGradQueue* defer = nullptr,
                   ExpertExchange* ep = nullptr);

RoutingSpec RoutingFromConfig(const ModelConfig& cfg);

}  // namespace troupe
