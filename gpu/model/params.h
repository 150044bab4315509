// ModelParams: every tensor of the model, laid out as BRIEF §1 defines it.
//
// One struct shape serves four roles (weights, gradients, Adam m, Adam v), so
// the optimizer walks them in lockstep through List(). Fused layouts, chosen
// so that one GEMM does the work of two (the export splits them again):
//   gate_up  [2F, d]      rows [0, F) = W_1 (gate), rows [F, 2F) = W_3 (up)
//   experts  [E, 2F, d] and [E, d, F]
//   kv_a     [d_c + d_r, d]  rows [0, d_c) = W_DKV, rows [d_c, ..) = W_KR
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "configs/config.h"
#include "gpu/backend.h"

namespace troupe {

struct SwiGluParams {
  Tensor gate_up;  // [2F, d]
  Tensor down;     // [d, F]
};

struct MlaParams {
  Tensor q_a;        // [d_cq, d]
  Tensor q_a_norm;   // [d_cq]
  Tensor q_b;        // [n_h * (d_h + d_r), d_cq]   per head: content, then rotary
  Tensor kv_a;       // [d_c + d_r, d]
  Tensor kv_a_norm;  // [d_c]
  Tensor kv_b;       // [n_h * (d_h + d_v), d_c]    per head: key content, then value
  Tensor o;          // [d, n_h * d_v]
};

struct MoeParams {
  Tensor router;           // [E, d]   affinity s_i = sigmoid(x . e_i)
  Tensor bias;             // [E]      selection-only bias b (no gradient)
  Tensor experts_gate_up;  // [E, 2F, d]
  Tensor experts_down;     // [E, d, F]
  SwiGluParams shared;     // all shared experts fused: F = n_shared * moe_intermediate_size
};

// One transformer layer; MTP modules add the four trailing tensors.
struct LayerParams {
  bool is_moe = false;
  bool is_mtp = false;
  Tensor input_norm;  // [d]
  MlaParams attn;
  Tensor post_norm;    // [d]
  SwiGluParams dense;  // when !is_moe
  MoeParams moe;       // when is_moe
  Tensor enorm;        // [d]      MTP: norm of the shifted token's embedding
  Tensor hnorm;        // [d]      MTP: norm of the previous depth's hidden state
  Tensor eh_proj;      // [d, 2d]  MTP: M_k, input [enorm(emb) ; hnorm(h)]
  Tensor head_norm;    // [d]      MTP: its own final norm (shared_head.norm)
};

struct ModelParams {
  Tensor embed;                     // [V, d]
  std::vector<LayerParams> layers;  // L main layers, then D MTP modules
  Tensor final_norm;                // [d]
  Tensor lm_head;                   // [V, d]
  // Expert parallelism: the routed-expert tensors hold experts
  // [expert_first, expert_first + their dim 0) of every MoE layer.
  int expert_first = 0;
};

// A parameter with its internal name (HF-style, fused tensors named
// "...gate_up_proj") and its optimizer treatment.
struct ParamRef {
  std::string name;
  Tensor* tensor;
  bool trainable;     // false for the routing bias
  bool weight_decay;  // matrices only
};

// The part of the network one pipeline stage runs (BRIEF §2): main layers
// [first_layer, end_layer) (end -1 = to the last), the embedding on the first
// stage, the final norm, main head and MTP modules on the last.
struct StageSpan {
  int first_layer = 0;
  int end_layer = -1;
  bool first = true;
  bool last = true;
  // Expert parallelism: the routed experts are split evenly over ep ranks
  // and this stage holds rank ep_rank's contiguous share.
  int ep = 1;
  int ep_rank = 0;
  bool whole() const { return first && last && first_layer == 0 && end_layer < 0 && ep == 1; }
};

// Which parameters a Model holds; the rest keep their name and shape but no
// storage (Tensor::defined() is false) and are skipped by ListParams.
struct ParamSelection {
  bool embed = true;
  int first_layer = 0, end_layer = -1;      // main layers held; -1 = to the last
  bool mtp = true;                          // the MTP modules
  bool head = true;                         // final norm and lm_head
  int expert_first = 0, expert_count = -1;  // routed experts held; -1 = all
  // A stage's own tensors; the last stage also holds the embedding when
  // there are MTP modules (they embed the shifted tokens), as V3 does.
  static ParamSelection ForStage(const ModelConfig& cfg, const StageSpan& span);
  bool HoldsLayer(const ModelConfig& cfg, int layer) const;
};

// Allocates zeroed tensors for the selected parameters of `cfg` on `backend`.
Expected<ModelParams> AllocateParams(Backend& backend, const ModelConfig& cfg, DType dtype,
                                     const ParamSelection& selection = {});
// Norm weights 1, routing biases 0, matrices N(0, init_std^2) from `seed`
// (the output projections o and down scaled by 1/sqrt(2 * layers), GPT-2 style).
// Drawn on the host in a fixed order over the whole model, so every backend
// and every pipeline stage gets the same bits as a whole-model run.
Status InitParams(Backend& backend, const ModelConfig& cfg, uint64_t seed, ModelParams& params);
// False for the routing biases, which gradients never touch.
bool IsTrainableParam(const std::string& name);
// Names of the tensors `selection` holds, in ListParams order, without
// allocating anything.
std::vector<std::string> ParamNames(const ModelConfig& cfg, const ParamSelection& selection);
// Every held tensor, in a fixed order (the order of optimizer updates and files).
std::vector<ParamRef> ListParams(ModelParams& params);
int64_t CountParams(ModelParams& params);
// Parameters a token touches: routed experts count K of E.
int64_t CountActiveParams(const ModelConfig& cfg, ModelParams& params);

}  // namespace troupe
