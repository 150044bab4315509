#include "gpu/model/layer.h"

#include <cmath>

#include "gpu/model/linear.h"
#include "gpu/model/moe_ep.h"

namespace troupe {
namespace {

class Maker {
 public:
  Maker(Backend& be, DType dtype) : be_(be), dtype_(dtype) {}
  Status operator()(Tensor& t, std::vector<int64_t> shape, const char* name, DType dtype) {
    auto r = be_.Alloc(std::move(shape), dtype, name);
    if (!r.ok()) return r.status();
    t = std::move(r).value();
    return Status::Ok();
  }
  Status operator()(Tensor& t, std::vector<int64_t> shape, const char* name) {
    return (*this)(t, std::move(shape), name, dtype_);
  }

 private:
  Backend& be_;
  DType dtype_;
};

double Scale(const ModelConfig& c) {
  return 1.0 / std::sqrt(static_cast<double>(c.qk_nope_head_dim + c.qk_rope_head_dim));
}

}  // namespace

RoutingSpec RoutingFromConfig(const ModelConfig& c) {
  RoutingSpec r;
  r.top_k = c.num_experts_per_tok;
  r.n_group = c.n_group;
  r.topk_group = c.topk_group;
  r.scale = c.routed_scaling_factor;
  r.normalize = c.norm_topk_prob;
  return r;
}

Status AllocateLayerActs(Backend& be, const ModelConfig& c, const LayerParams& p, BatchShape shape, DType dtype,
                         LayerActs& a) {
  Maker make(be, dtype);
  const int64_t n = shape.tokens(), d = c.hidden_size, nh = c.num_attention_heads;
  const int64_t dh = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  TROUPE_RETURN_IF_ERROR(make(a.ln1, {n, d}, "act.ln1"));
  TROUPE_RETURN_IF_ERROR(make(a.rstd1, {n}, "act.rstd1"));
  TROUPE_RETURN_IF_ERROR(make(a.cq_pre, {n, c.q_lora_rank}, "act.cq_pre"));
  TROUPE_RETURN_IF_ERROR(make(a.cq, {n, c.q_lora_rank}, "act.cq"));
  TROUPE_RETURN_IF_ERROR(make(a.rstd_q, {n}, "act.rstd_q"));
  TROUPE_RETURN_IF_ERROR(make(a.q, {n, nh, dh + dr}, "act.q"));
  TROUPE_RETURN_IF_ERROR(make(a.ckv_pre, {n, c.kv_lora_rank}, "act.ckv_pre"));
  TROUPE_RETURN_IF_ERROR(make(a.ckv, {n, c.kv_lora_rank}, "act.ckv"));
  TROUPE_RETURN_IF_ERROR(make(a.rstd_kv, {n}, "act.rstd_kv"));
  TROUPE_RETURN_IF_ERROR(make(a.k_rope, {n, dr}, "act.k_rope"));
  TROUPE_RETURN_IF_ERROR(make(a.kv, {n, nh, dh + dv}, "act.kv"));
  TROUPE_RETURN_IF_ERROR(make(a.att, {n, nh, dv}, "act.att"));
  TROUPE_RETURN_IF_ERROR(make(a.lse, {n, nh}, "act.lse"));
  TROUPE_RETURN_IF_ERROR(make(a.h1, {n, d}, "act.h1"));
  TROUPE_RETURN_IF_ERROR(make(a.ln2, {n, d}, "act.ln2"));
  TROUPE_RETURN_IF_ERROR(make(a.rstd2, {n}, "act.rstd2"));
  TROUPE_RETURN_IF_ERROR(make(a.ffn, {n, d}, "act.ffn"));
  if (!p.is_moe) {
    const int64_t f = c.intermediate_size;
    TROUPE_RETURN_IF_ERROR(make(a.gate_up, {n, 2 * f}, "act.gate_up"));
    TROUPE_RETURN_IF_ERROR(make(a.act, {n, f}, "act.swiglu"));
    return Status::Ok();
  }
  const int64_t e = c.n_routed_experts, k = c.num_experts_per_tok, f = c.moe_intermediate_size;
  const int64_t fs = c.n_shared_experts * f;
  const int64_t local = p.moe.experts_gate_up.dim(0), ep = e / local;
  TROUPE_RETURN_IF_ERROR(make(a.router_logits, {n, e}, "act.router_logits"));
  TROUPE_RETURN_IF_ERROR(make(a.scores, {n, e}, "act.scores"));
  TROUPE_RETURN_IF_ERROR(make(a.topk_idx, {n, k}, "act.topk_idx", DType::kI32));
  TROUPE_RETURN_IF_ERROR(make(a.topk_gate, {n, k}, "act.topk_gate"));
  TROUPE_RETURN_IF_ERROR(make(a.x_sorted, {n * k, d}, "act.x_sorted"));
  TROUPE_RETURN_IF_ERROR(make(a.offsets, {e + 1}, "act.offsets", DType::kI32));
  TROUPE_RETURN_IF_ERROR(make(a.slot, {n, k}, "act.slot", DType::kI32));
  TROUPE_RETURN_IF_ERROR(make(a.e_gate_up, {ep * n * k, 2 * f}, "act.expert_gate_up"));
  TROUPE_RETURN_IF_ERROR(make(a.e_act, {ep * n * k, f}, "act.expert_swiglu"));
  if (ep > 1) {
    TROUPE_RETURN_IF_ERROR(make(a.x_recv, {ep * n * k, d}, "act.expert_x_received"));
    TROUPE_RETURN_IF_ERROR(make(a.y_recv, {ep * n * k, d}, "act.expert_y_received"));
    TROUPE_RETURN_IF_ERROR(make(a.offsets_local, {local + 1}, "act.expert_offsets_local", DType::kI32));
  }
  TROUPE_RETURN_IF_ERROR(make(a.e_out, {n * k, d}, "act.expert_out"));
  TROUPE_RETURN_IF_ERROR(make(a.s_gate_up, {n, 2 * fs}, "act.shared_gate_up"));
  TROUPE_RETURN_IF_ERROR(make(a.s_act, {n, fs}, "act.shared_swiglu"));
  TROUPE_RETURN_IF_ERROR(make(a.balance, {shape.batch}, "act.balance"));
  TROUPE_RETURN_IF_ERROR(make(a.load, {e}, "act.load", DType::kI32));
  return Status::Ok();
}

Status AllocateLayerScratch(Backend& be, const ModelConfig& c, BatchShape shape, DType dtype, LayerScratch& s, int ep) {
  Maker make(be, dtype);
  const int64_t n = shape.tokens(), d = c.hidden_size, nh = c.num_attention_heads;
  const int64_t dh = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const int64_t e = c.n_routed_experts, k = c.num_experts_per_tok, f = c.moe_intermediate_size;
  const int64_t fmax = std::max<int64_t>(c.intermediate_size, static_cast<int64_t>(c.n_shared_experts) * f);
  TROUPE_RETURN_IF_ERROR(make(s.d_h1, {n, d}, "grad.h1"));
  TROUPE_RETURN_IF_ERROR(make(s.d_ln2, {n, d}, "grad.ln2"));
  TROUPE_RETURN_IF_ERROR(make(s.d_ffn_hidden, {n, fmax}, "grad.ffn_hidden"));
  TROUPE_RETURN_IF_ERROR(make(s.d_gate_up, {n, 2 * fmax}, "grad.gate_up"));
  TROUPE_RETURN_IF_ERROR(make(s.d_y_sorted, {n * k, d}, "grad.y_sorted"));
  TROUPE_RETURN_IF_ERROR(make(s.d_gate, {n, k}, "grad.gate"));
  TROUPE_RETURN_IF_ERROR(make(s.d_e_act, {ep * n * k, f}, "grad.expert_swiglu"));
  TROUPE_RETURN_IF_ERROR(make(s.d_e_gate_up, {ep * n * k, 2 * f}, "grad.expert_gate_up"));
  if (ep > 1) {
    TROUPE_RETURN_IF_ERROR(make(s.d_y_recv, {ep * n * k, d}, "grad.expert_y_received"));
    TROUPE_RETURN_IF_ERROR(make(s.d_x_recv, {ep * n * k, d}, "grad.expert_x_received"));
  }
  TROUPE_RETURN_IF_ERROR(make(s.d_x_sorted, {n * k, d}, "grad.x_sorted"));
  TROUPE_RETURN_IF_ERROR(make(s.d_scores, {n, e}, "grad.scores"));
  TROUPE_RETURN_IF_ERROR(make(s.d_router_logits, {n, e}, "grad.router_logits"));
  TROUPE_RETURN_IF_ERROR(make(s.d_att, {n, nh, dv}, "grad.att"));
  TROUPE_RETURN_IF_ERROR(make(s.d_q, {n, nh, dh + dr}, "grad.q"));
  TROUPE_RETURN_IF_ERROR(make(s.d_kv, {n, nh, dh + dv}, "grad.kv"));
  TROUPE_RETURN_IF_ERROR(make(s.d_k_rope, {n, dr}, "grad.k_rope"));
  TROUPE_RETURN_IF_ERROR(make(s.d_ckv, {n, c.kv_lora_rank}, "grad.ckv"));
  TROUPE_RETURN_IF_ERROR(make(s.d_ckv_pre, {n, c.kv_lora_rank}, "grad.ckv_pre"));
  TROUPE_RETURN_IF_ERROR(make(s.d_cq, {n, c.q_lora_rank}, "grad.cq"));
  TROUPE_RETURN_IF_ERROR(make(s.d_cq_pre, {n, c.q_lora_rank}, "grad.cq_pre"));
  TROUPE_RETURN_IF_ERROR(make(s.d_ln1, {n, d}, "grad.ln1"));
  return Status::Ok();
}

// ---- forward --------------------------------------------------------------

namespace {

void MlaForward(Backend& be, const ModelConfig& c, const MlaParams& p, LayerActs& a, BatchShape shape, Tensor& out) {
  const int dc = c.kv_lora_rank, dh = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  Linear(be, a.cq_pre, a.ln1, p.q_a);  // (N, d_cq)
  be.RmsNormForward(a.cq, a.rstd_q, a.cq_pre, p.q_a_norm, c.rms_norm_eps);
  Linear(be, a.q, a.cq, p.q_b);  // (N, n_h, d_h + d_r)
  be.RopeForward(a.q, dh, dr, shape.seq_len, c.rope_theta);
  Linear(be, a.ckv_pre, a.ln1, p.kv_a.SliceRows(0, dc));       // (N, d_c)
  Linear(be, a.k_rope, a.ln1, p.kv_a.SliceRows(dc, dc + dr));  // (N, d_r)
  Tensor k_rope_heads = a.k_rope.Reshape({shape.tokens(), 1, dr});
  be.RopeForward(k_rope_heads, 0, dr, shape.seq_len, c.rope_theta);
  be.RmsNormForward(a.ckv, a.rstd_kv, a.ckv_pre, p.kv_a_norm, c.rms_norm_eps);
  Linear(be, a.kv, a.ckv, p.kv_b);  // (N, n_h, d_h + d_v)
  be.MlaAttentionForward(a.att, a.lse, a.q, a.kv, a.k_rope, shape.seq_len, dh, Scale(c));
  Linear(be, out, a.att, p.o);  // (N, d)
}

void MoeForward(Backend& be, const ModelConfig& c, const MoeParams& p, LayerActs& a, BatchShape shape,
                double balance_alpha, ExpertExchange* ep) {
  Linear(be, a.router_logits, a.ln2, p.router);  // (N, E)
  be.SigmoidForward(a.scores, a.router_logits);
  be.MoeRoute(a.topk_idx, a.topk_gate, a.scores, p.bias, RoutingFromConfig(c));
  be.MoeExpertLoad(a.load, a.topk_idx, c.n_routed_experts);
  be.MoeBalanceLoss(a.balance, a.scores, a.topk_idx, shape.seq_len, balance_alpha);
  // Routed experts: sort the token copies by expert, one grouped GEMM per projection.
  be.MoePermute(a.x_sorted, a.offsets, a.slot, a.ln2, a.topk_idx, c.n_routed_experts);
  const bool split = ep != nullptr && ep->size() > 1;
  if (split) {
    StartRoutedExpertsForwardEp(be, p, a, *ep);  // the rows travel while the shared experts run
  } else {
    const int64_t rows = a.x_sorted.rows();
    Tensor gate_up = a.e_gate_up.Prefix({rows, a.e_gate_up.cols()}), act = a.e_act.Prefix({rows, a.e_act.cols()});
    be.GroupedLinearForward(gate_up, a.x_sorted, p.experts_gate_up, a.offsets);
    be.SwiGluForward(act, gate_up);
    be.GroupedLinearForward(a.e_out, act, p.experts_down, a.offsets);
  }
  // Shared experts see every token; the routed outputs are added on top.
  Linear(be, a.s_gate_up, a.ln2, p.shared.gate_up);
  be.SwiGluForward(a.s_act, a.s_gate_up);
  Linear(be, a.ffn, a.s_act, p.shared.down);
  if (split) FinishRoutedExpertsForwardEp(be, p, a, *ep);
  be.MoeCombine(a.ffn, a.e_out, a.topk_gate, a.slot);
}

}  // namespace

void LayerForward(Backend& be, const ModelConfig& c, const LayerParams& p, LayerActs& a, BatchShape shape,
                  const Tensor& x, Tensor& out, double balance_alpha, ExpertExchange* ep) {
  be.RmsNormForward(a.ln1, a.rstd1, x, p.input_norm, c.rms_norm_eps);
  MlaForward(be, c, p.attn, a, shape, a.h1);  // h1 = attention output for now
  be.Add(a.h1, a.h1, x);                      // h1 = x + MLA(ln1)
  be.RmsNormForward(a.ln2, a.rstd2, a.h1, p.post_norm, c.rms_norm_eps);
  FfnForward(be, c, p, a, shape, balance_alpha, ep);
  be.Add(out, a.h1, a.ffn);
}

void FfnForward(Backend& be, const ModelConfig& c, const LayerParams& p, LayerActs& a, BatchShape shape,
                double balance_alpha, ExpertExchange* ep) {
  if (p.is_moe) {
    MoeForward(be, c, p.moe, a, shape, balance_alpha, ep);
  } else {
    Linear(be, a.gate_up, a.ln2, p.dense.gate_up);
    be.SwiGluForward(a.act, a.gate_up);
    Linear(be, a.ffn, a.act, p.dense.down);
  }
}

// ---- backward -------------------------------------------------------------

namespace {

void SwiGluBackwardPath(Backend& be, LayerScratch& s, const SwiGluParams& p, SwiGluParams& g, const Tensor& in,
                        const Tensor& gate_up, const Tensor& act, const Tensor& d_out, Tensor& d_in,
                        WeightGradQueue* defer) {
  const int64_t n = in.rows(), f = act.cols();
  Tensor d_act = s.d_ffn_hidden.Prefix({n, f});  // scratch is sized for the widest FFN
  Tensor d_gate_up = s.d_gate_up.Prefix({n, 2 * f});
  be.Zero(d_act);
  be.Zero(d_gate_up);
  LinearBackward(be, d_act, g.down, d_out, act, p.down, defer);
  be.SwiGluBackward(d_gate_up, d_act, gate_up);
  LinearBackward(be, d_in, g.gate_up, d_gate_up, in, p.gate_up, defer);
}

// din += dout w_e per expert; dw += dout_e^T in_e now or, with `defer`, in W.
void GroupedBackward(Backend& be, Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                     const Tensor& offsets, WeightGradQueue* defer) {
  if (!defer) return be.GroupedLinearBackward(din, dw, dout, in, w, offsets);
  Tensor no_weights;
  be.GroupedLinearBackward(din, no_weights, dout, in, w, offsets);
  defer->DeferGrouped(be, dw, dout, in, w, offsets);
}

void MoeBackward(Backend& be, const ModelConfig& c, const MoeParams& p, MoeParams& g, LayerActs& a, LayerScratch& s,
                 BatchShape shape, const Tensor& d_ffn, double balance_alpha, double balance_dloss,
                 WeightGradQueue* defer, ExpertExchange* ep) {
  // Routed experts, reverse of: permute -> gate_up -> swiglu -> down -> combine.
  be.MoeCombineBackward(s.d_y_sorted, s.d_gate, d_ffn, a.e_out, a.topk_gate, a.slot);
  if (ep != nullptr && ep->size() > 1) {
    RoutedExpertsBackwardEp(be, p, g, a, s, *ep, defer);
  } else {
    const int64_t rows = a.x_sorted.rows();
    auto prefix = [rows](const Tensor& t) { return t.Prefix({rows, t.cols()}); };
    Tensor d_act = prefix(s.d_e_act), d_gate_up = prefix(s.d_e_gate_up);
    be.Zero(d_act);
    GroupedBackward(be, d_act, g.experts_down, s.d_y_sorted, prefix(a.e_act), p.experts_down, a.offsets, defer);
    be.Zero(d_gate_up);
    be.SwiGluBackward(d_gate_up, d_act, prefix(a.e_gate_up));
    be.Zero(s.d_x_sorted);
    GroupedBackward(be, s.d_x_sorted, g.experts_gate_up, d_gate_up, a.x_sorted, p.experts_gate_up, a.offsets, defer);
  }
  be.MoePermuteBackward(s.d_ln2, s.d_x_sorted, a.slot);
  // Shared experts.
  SwiGluBackwardPath(be, s, p.shared, g.shared, a.ln2, a.s_gate_up, a.s_act, d_ffn, s.d_ln2, defer);
  // Router: through the gates and the balance loss into the affinities.
  be.Zero(s.d_scores);
  be.MoeRouteBackward(s.d_scores, s.d_gate, a.scores, a.topk_idx, RoutingFromConfig(c));
  if (balance_alpha != 0.0) {
    be.MoeBalanceLossBackward(s.d_scores, a.scores, a.topk_idx, shape.seq_len, balance_alpha, balance_dloss);
  }
  be.Zero(s.d_router_logits);
  be.SigmoidBackward(s.d_router_logits, s.d_scores, a.scores);
  LinearBackward(be, s.d_ln2, g.router, s.d_router_logits, a.ln2, p.router, defer);
}

void MlaBackward(Backend& be, const ModelConfig& c, const MlaParams& p, MlaParams& g, LayerActs& a, LayerScratch& s,
                 BatchShape shape, const Tensor& d_out, WeightGradQueue* defer) {
  const int dc = c.kv_lora_rank, dh = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  be.Zero(s.d_att);
  LinearBackward(be, s.d_att, g.o, d_out, a.att, p.o, defer);
  be.Zero(s.d_q);
  be.Zero(s.d_kv);
  be.Zero(s.d_k_rope);
  be.MlaAttentionBackward(s.d_q, s.d_kv, s.d_k_rope, s.d_att, a.att, a.lse, a.q, a.kv, a.k_rope, shape.seq_len, dh,
                          Scale(c));
  // KV path: kv_b, then the latent norm, then the rotary key.
  be.Zero(s.d_ckv);
  LinearBackward(be, s.d_ckv, g.kv_b, s.d_kv, a.ckv, p.kv_b, defer);
  be.Zero(s.d_ckv_pre);
  be.RmsNormBackward(s.d_ckv_pre, g.kv_a_norm, s.d_ckv, a.ckv_pre, p.kv_a_norm, a.rstd_kv);
  Tensor d_k_rope_heads = s.d_k_rope.Reshape({shape.tokens(), 1, dr});
  be.RopeBackward(d_k_rope_heads, 0, dr, shape.seq_len, c.rope_theta);
  be.Zero(s.d_ln1);
  Tensor g_kv_a_c = g.kv_a.SliceRows(0, dc), g_kv_a_r = g.kv_a.SliceRows(dc, dc + dr);
  LinearBackward(be, s.d_ln1, g_kv_a_c, s.d_ckv_pre, a.ln1, p.kv_a.SliceRows(0, dc), defer);
  LinearBackward(be, s.d_ln1, g_kv_a_r, s.d_k_rope, a.ln1, p.kv_a.SliceRows(dc, dc + dr), defer);
  // Query path.
  be.RopeBackward(s.d_q, dh, dr, shape.seq_len, c.rope_theta);
  be.Zero(s.d_cq);
  LinearBackward(be, s.d_cq, g.q_b, s.d_q, a.cq, p.q_b, defer);
  be.Zero(s.d_cq_pre);
  be.RmsNormBackward(s.d_cq_pre, g.q_a_norm, s.d_cq, a.cq_pre, p.q_a_norm, a.rstd_q);
  LinearBackward(be, s.d_ln1, g.q_a, s.d_cq_pre, a.ln1, p.q_a, defer);
}

}  // namespace

void LayerBackward(Backend& be, const ModelConfig& c, const LayerParams& p, LayerParams& g, LayerActs& a,
                   LayerScratch& s, BatchShape shape, const Tensor& x, const Tensor& d_out, Tensor& d_x,
                   double balance_alpha, double balance_dloss, WeightGradQueue* defer, ExpertExchange* ep) {
  // out = h1 + ffn(ln2(h1)): d_h1 = d_out + d(ffn path).
  be.Copy(s.d_h1, d_out);
  be.Zero(s.d_ln2);
  if (p.is_moe) {
    MoeBackward(be, c, p.moe, g.moe, a, s, shape, d_out, balance_alpha, balance_dloss, defer, ep);
  } else {
    SwiGluBackwardPath(be, s, p.dense, g.dense, a.ln2, a.gate_up, a.act, d_out, s.d_ln2, defer);
  }
  be.RmsNormBackward(s.d_h1, g.post_norm, s.d_ln2, a.h1, p.post_norm, a.rstd2);
  // h1 = x + mla(ln1(x)).
  be.Axpy(d_x, 1.0, s.d_h1);
  MlaBackward(be, c, p.attn, g.attn, a, s, shape, s.d_h1, defer);
  be.RmsNormBackward(d_x, g.input_norm, s.d_ln1, x, p.input_norm, a.rstd1);
}

}  // namespace troupe
