#include "gpu/model/params.h"

#include <cmath>

#include "common/rng.h"

namespace troupe {
namespace {

// Allocation helper that names tensors as they will appear in files.
// Tensors outside the selection get their shape and name but no storage
// (defined() is false), so InitParams can still walk the whole model in order.
// With no backend it only lists the names it would allocate.
class Allocator {
 public:
  Allocator(Backend* be, DType dtype, std::vector<std::string>* names = nullptr)
      : be_(be), dtype_(dtype), names_(names) {}
  void Select(bool on) { selected_ = on; }
  Status Make(Tensor& t, std::vector<int64_t> shape, std::string name) {
    if (selected_ && names_ != nullptr) names_->push_back(name);
    if (!selected_ || be_ == nullptr) {
      t = Tensor(nullptr, 0, std::move(shape), dtype_, std::move(name));
      return Status::Ok();
    }
    auto r = be_->Alloc(std::move(shape), dtype_, std::move(name));
    if (!r.ok()) return r.status();
    t = std::move(r).value();
    return Status::Ok();
  }

 private:
  Backend* be_;
  DType dtype_;
  std::vector<std::string>* names_;
  bool selected_ = true;
};

Status AllocSwiGlu(Allocator& a, SwiGluParams& p, int64_t d, int64_t f, const std::string& prefix) {
  TROUPE_RETURN_IF_ERROR(a.Make(p.gate_up, {2 * f, d}, prefix + ".gate_up_proj.weight"));
  return a.Make(p.down, {d, f}, prefix + ".down_proj.weight");
}

Status AllocLayer(Allocator& a, const ModelConfig& c, LayerParams& l, int index, bool is_moe, bool is_mtp,
                  int64_t experts) {
  const int64_t d = c.hidden_size, nh = c.num_attention_heads;
  const int64_t dh = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const std::string p = "model.layers." + std::to_string(index);
  l.is_moe = is_moe;
  l.is_mtp = is_mtp;
  TROUPE_RETURN_IF_ERROR(a.Make(l.input_norm, {d}, p + ".input_layernorm.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.q_a, {c.q_lora_rank, d}, p + ".self_attn.q_a_proj.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.q_a_norm, {c.q_lora_rank}, p + ".self_attn.q_a_layernorm.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.q_b, {nh * (dh + dr), c.q_lora_rank}, p + ".self_attn.q_b_proj.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.kv_a, {c.kv_lora_rank + dr, d}, p + ".self_attn.kv_a_proj_with_mqa.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.kv_a_norm, {c.kv_lora_rank}, p + ".self_attn.kv_a_layernorm.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.kv_b, {nh * (dh + dv), c.kv_lora_rank}, p + ".self_attn.kv_b_proj.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.attn.o, {d, nh * dv}, p + ".self_attn.o_proj.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(l.post_norm, {d}, p + ".post_attention_layernorm.weight"));
  if (is_moe) {
    const int64_t e = c.n_routed_experts, f = c.moe_intermediate_size;
    TROUPE_RETURN_IF_ERROR(a.Make(l.moe.router, {e, d}, p + ".mlp.gate.weight"));
    TROUPE_RETURN_IF_ERROR(a.Make(l.moe.bias, {e}, p + ".mlp.gate.e_score_correction_bias"));
    TROUPE_RETURN_IF_ERROR(a.Make(l.moe.experts_gate_up, {experts, 2 * f, d}, p + ".mlp.experts.gate_up_proj.weight"));
    TROUPE_RETURN_IF_ERROR(a.Make(l.moe.experts_down, {experts, d, f}, p + ".mlp.experts.down_proj.weight"));
    TROUPE_RETURN_IF_ERROR(AllocSwiGlu(a, l.moe.shared, d, c.n_shared_experts * f, p + ".mlp.shared_experts"));
  } else {
    TROUPE_RETURN_IF_ERROR(AllocSwiGlu(a, l.dense, d, c.intermediate_size, p + ".mlp"));
  }
  if (is_mtp) {
    TROUPE_RETURN_IF_ERROR(a.Make(l.enorm, {d}, p + ".enorm.weight"));
    TROUPE_RETURN_IF_ERROR(a.Make(l.hnorm, {d}, p + ".hnorm.weight"));
    TROUPE_RETURN_IF_ERROR(a.Make(l.eh_proj, {d, 2 * d}, p + ".eh_proj.weight"));
    TROUPE_RETURN_IF_ERROR(a.Make(l.head_norm, {d}, p + ".shared_head.norm.weight"));
  }
  return Status::Ok();
}

bool IsRoutedExpert(const std::string& name) { return name.find(".mlp.experts.") != std::string::npos; }
bool IsNorm(const std::string& name) { return name.find("norm") != std::string::npos; }
bool IsBias(const std::string& name) { return name.find("e_score_correction_bias") != std::string::npos; }
bool IsOutputProjection(const std::string& name) {
  return name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos;
}

// Every tensor, held or not, in the fixed order.
std::vector<ParamRef> ListAllParams(ModelParams& p) {
  std::vector<ParamRef> out;
  auto add = [&out](Tensor& t) {
    const std::string& n = t.name();
    out.push_back({n, &t, !IsBias(n), t.ndim() >= 2});
  };
  add(p.embed);
  for (LayerParams& l : p.layers) {
    add(l.input_norm);
    add(l.attn.q_a);
    add(l.attn.q_a_norm);
    add(l.attn.q_b);
    add(l.attn.kv_a);
    add(l.attn.kv_a_norm);
    add(l.attn.kv_b);
    add(l.attn.o);
    add(l.post_norm);
    if (l.is_moe) {
      add(l.moe.router);
      add(l.moe.bias);
      add(l.moe.experts_gate_up);
      add(l.moe.experts_down);
      add(l.moe.shared.gate_up);
      add(l.moe.shared.down);
    } else {
      add(l.dense.gate_up);
      add(l.dense.down);
    }
    if (l.is_mtp) {
      add(l.enorm);
      add(l.hnorm);
      add(l.eh_proj);
      add(l.head_norm);
    }
  }
  add(p.final_norm);
  add(p.lm_head);
  return out;
}

}  // namespace

ParamSelection ParamSelection::ForStage(const ModelConfig& c, const StageSpan& s) {
  ParamSelection sel;
  sel.embed = s.first || (s.last && c.num_nextn_predict_layers > 0);  // MTP embeds its shifted tokens
  sel.first_layer = s.first_layer;
  sel.end_layer = s.end_layer;
  sel.mtp = s.last;
  sel.head = s.last;
  if (s.ep > 1) {
    sel.expert_count = c.n_routed_experts / s.ep;
    sel.expert_first = s.ep_rank * sel.expert_count;
  }
  return sel;
}

bool ParamSelection::HoldsLayer(const ModelConfig& c, int layer) const {
  if (layer >= c.num_hidden_layers) return mtp;
  return layer >= first_layer && (end_layer < 0 || layer < end_layer);
}

namespace {

Expected<ModelParams> Build(Allocator& a, const ModelConfig& c, const ParamSelection& sel) {
  ModelParams p;
  p.expert_first = sel.expert_count < 0 ? 0 : sel.expert_first;
  a.Select(sel.embed);
  TROUPE_RETURN_IF_ERROR(a.Make(p.embed, {c.vocab_size, c.hidden_size}, "model.embed_tokens.weight"));
  const int total = c.num_hidden_layers + c.num_nextn_predict_layers;
  p.layers.resize(total);
  for (int i = 0; i < total; ++i) {
    a.Select(sel.HoldsLayer(c, i));
    TROUPE_RETURN_IF_ERROR(AllocLayer(a, c, p.layers[i], i, i >= c.first_k_dense_replace, i >= c.num_hidden_layers,
                                      sel.expert_count < 0 ? c.n_routed_experts : sel.expert_count));
  }
  a.Select(sel.head);
  TROUPE_RETURN_IF_ERROR(a.Make(p.final_norm, {c.hidden_size}, "model.norm.weight"));
  TROUPE_RETURN_IF_ERROR(a.Make(p.lm_head, {c.vocab_size, c.hidden_size}, "lm_head.weight"));
  return p;
}

}  // namespace

Expected<ModelParams> AllocateParams(Backend& backend, const ModelConfig& c, DType dtype, const ParamSelection& sel) {
  Allocator a(&backend, dtype);
  return Build(a, c, sel);
}

bool IsTrainableParam(const std::string& name) { return !IsBias(name); }

std::vector<std::string> ParamNames(const ModelConfig& c, const ParamSelection& sel) {
  std::vector<std::string> names;
  Allocator a(nullptr, DType::kF32, &names);
  (void)Build(a, c, sel);  // cannot fail: nothing is allocated
  return names;
}

std::vector<ParamRef> ListParams(ModelParams& p) {
  std::vector<ParamRef> out;
  for (ParamRef& r : ListAllParams(p)) {
    if (r.tensor->defined()) out.push_back(r);
  }
  return out;
}

Status InitParams(Backend& backend, const ModelConfig& c, uint64_t seed, ModelParams& params) {
  Rng rng(seed);
  const double out_scale = 1.0 / std::sqrt(2.0 * (c.num_hidden_layers + c.num_nextn_predict_layers));
  // Tensors this stage does not hold still draw their numbers, so every stage
  // of a pipeline gets exactly the bits the whole model would.
  for (ParamRef& r : ListAllParams(params)) {
    Tensor& t = *r.tensor;
    // An expert shard draws all E experts' numbers and keeps its own.
    const bool shard = IsRoutedExpert(r.name) && t.dim(0) != c.n_routed_experts;
    const int64_t per_expert = t.numel() / t.dim(0);
    std::vector<double> host(static_cast<size_t>(shard ? per_expert * c.n_routed_experts : t.numel()));
    if (IsBias(r.name)) {
      // zeros
    } else if (IsNorm(r.name)) {
      for (double& x : host) x = 1.0;
    } else {
      const double std = c.init_std * (IsOutputProjection(r.name) ? out_scale : 1.0);
      for (double& x : host) x = std * rng.Normal();
    }
    if (!t.defined()) continue;
    if (shard) {
      host.erase(host.begin(), host.begin() + params.expert_first * per_expert);
      host.resize(static_cast<size_t>(t.numel()));
    }
    if (t.dtype() == DType::kF64) {
      backend.CopyFromHost(t, host.data());
    } else if (t.dtype() == DType::kF32) {
      std::vector<float> f(host.begin(), host.end());
      backend.CopyFromHost(t, f.data());
    } else {
      return Status::InvalidArgument(std::string("parameters must be F32 or F64, not ") + DTypeName(t.dtype()));
    }
  }
  return Status::Ok();
}

int64_t CountParams(ModelParams& p) {
  int64_t n = 0;
  for (const ParamRef& r : ListParams(p)) n += r.tensor->numel();
  return n;
}

int64_t CountActiveParams(const ModelConfig& c, ModelParams& p) {
  int64_t n = 0;
  for (const ParamRef& r : ListParams(p)) {
    int64_t k = r.tensor->numel();
    if (r.name.find(".mlp.experts.") != std::string::npos) k = k / c.n_routed_experts * c.num_experts_per_tok;
    n += k;
  }
  return n;
}

}  // namespace troupe
