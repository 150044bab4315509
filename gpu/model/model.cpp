#include "gpu/model/model.h"

#include <string>

#include "gpu/host_io.h"
#include "gpu/model/linear.h"

namespace troupe {

Model::Model(Backend& be, const ModelConfig& cfg, BatchShape shape, StageSpan span)
    : be_(be), cfg_(cfg), shape_(shape), span_(span) {}

Expected<std::unique_ptr<Model>> Model::Create(Backend& be, const ModelConfig& cfg, DType dtype, int batch, int seq_len,
                                               StageSpan span, int slots) {
  if (batch < 1 || seq_len < 1) return Status::InvalidArgument("model: batch and seq_len must be positive");
  if (slots < 1) return Status::InvalidArgument("model: a stage needs at least one activation slot");
  if (span.ep < 1 || span.ep_rank < 0 || span.ep_rank >= span.ep || cfg.n_routed_experts % span.ep != 0)
    return Status::InvalidArgument("model: " + std::to_string(cfg.n_routed_experts) +
                                   " routed experts cannot be split over " + std::to_string(span.ep) + " ranks");
  const int end = span.end_layer < 0 ? cfg.num_hidden_layers : span.end_layer;
  if (span.first_layer < 0 || end > cfg.num_hidden_layers || span.first_layer > end)
    return Status::InvalidArgument("model: stage layers [" + std::to_string(span.first_layer) + ", " +
                                   std::to_string(end) + ") are not within the " +
                                   std::to_string(cfg.num_hidden_layers) + " layers");
  std::unique_ptr<Model> m(new Model(be, cfg, BatchShape{batch, seq_len}, span));
  TROUPE_RETURN_IF_ERROR(m->Allocate(dtype, slots));
  return m;
}

Status Model::Allocate(DType dtype, int slots) {
  dtype_ = dtype;
  const ParamSelection sel = ParamSelection::ForStage(cfg_, span_);
  TROUPE_ASSIGN_OR_RETURN(params_, AllocateParams(be_, cfg_, dtype, sel));
  TROUPE_ASSIGN_OR_RETURN(grads_, AllocateParams(be_, cfg_, dtype, sel));
  slots_.resize(slots);
  for (Slot& s : slots_) TROUPE_RETURN_IF_ERROR(AllocateSlot(dtype, s));
  const int64_t n = shape_.tokens(), d = cfg_.hidden_size;
  const int depth = span_.last ? cfg_.num_nextn_predict_layers : 0;
  auto make = [&](Tensor& t, std::vector<int64_t> shape, const std::string& name) -> Status {
    TROUPE_ASSIGN_OR_RETURN(t, be_.Alloc(std::move(shape), dtype, name));
    return Status::Ok();
  };
  TROUPE_RETURN_IF_ERROR(AllocateLayerScratch(be_, cfg_, shape_, dtype, scratch_, span_.ep));
  d_hidden_.resize(1 + depth);
  for (Tensor& t : d_hidden_) TROUPE_RETURN_IF_ERROR(make(t, {n, d}, "grad.hidden"));
  TROUPE_RETURN_IF_ERROR(make(d_resid_a_, {n, d}, "grad.residual_a"));
  TROUPE_RETURN_IF_ERROR(make(d_resid_b_, {n, d}, "grad.residual_b"));
  if (span_.last) {
    TROUPE_RETURN_IF_ERROR(make(d_normed_, {n, d}, "grad.head_normed"));
  }
  if (depth > 0) {
    TROUPE_RETURN_IF_ERROR(make(d_emb_, {n, d}, "grad.embedding"));
    TROUPE_RETURN_IF_ERROR(make(d_layer_in_, {n, d}, "grad.mtp_layer_in"));
    TROUPE_RETURN_IF_ERROR(make(d_en_, {n, d}, "grad.mtp_emb_normed"));
    TROUPE_RETURN_IF_ERROR(make(d_hn_, {n, d}, "grad.mtp_h_normed"));
    TROUPE_RETURN_IF_ERROR(make(d_cat_, {n, 2 * d}, "grad.mtp_cat"));
  }
  return Status::Ok();
}

Status Model::AllocateSlot(DType dtype, Slot& s) {
  const int64_t n = shape_.tokens(), d = cfg_.hidden_size, v = cfg_.vocab_size;
  const int depth = span_.last ? cfg_.num_nextn_predict_layers : 0;
  const int here = end_layer() - first_layer();
  auto make = [&](Tensor& t, std::vector<int64_t> shape, const std::string& name, DType dt) -> Status {
    TROUPE_ASSIGN_OR_RETURN(t, be_.Alloc(std::move(shape), dt, name));
    return Status::Ok();
  };
  if (span_.first) TROUPE_RETURN_IF_ERROR(make(s.embed_ids, {n}, "act.embed_ids", DType::kI32));
  s.resid.resize(here + 1);
  for (Tensor& t : s.resid) TROUPE_RETURN_IF_ERROR(make(t, {n, d}, "act.residual", dtype));
  s.acts.resize(here + depth);
  for (int i = 0; i < here + depth; ++i) {
    const int layer = i < here ? first_layer() + i : cfg_.num_hidden_layers + (i - here);
    TROUPE_RETURN_IF_ERROR(AllocateLayerActs(be_, cfg_, params_.layers[layer], shape_, dtype, s.acts[i]));
  }
  if (!span_.last) return Status::Ok();
  s.heads.resize(1 + depth);
  for (Head& h : s.heads) {
    TROUPE_RETURN_IF_ERROR(make(h.inputs, {n}, "act.head_inputs", DType::kI32));
    TROUPE_RETURN_IF_ERROR(make(h.targets, {n}, "act.head_targets", DType::kI32));
    TROUPE_RETURN_IF_ERROR(make(h.normed, {n, d}, "act.head_normed", dtype));
    TROUPE_RETURN_IF_ERROR(make(h.rstd, {n}, "act.head_rstd", dtype));
    TROUPE_RETURN_IF_ERROR(make(h.logits, {n, v}, "act.logits", dtype));
    TROUPE_RETURN_IF_ERROR(make(h.losses, {n}, "act.losses", dtype));
  }
  s.mtp.resize(depth);
  for (MtpActs& m : s.mtp) {
    TROUPE_RETURN_IF_ERROR(make(m.emb, {n, d}, "act.mtp_emb", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.emb_normed, {n, d}, "act.mtp_emb_normed", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.emb_rstd, {n}, "act.mtp_emb_rstd", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.h_normed, {n, d}, "act.mtp_h_normed", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.h_rstd, {n}, "act.mtp_h_rstd", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.cat, {n, 2 * d}, "act.mtp_cat", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.layer_in, {n, d}, "act.mtp_layer_in", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.out, {n, d}, "act.mtp_out", dtype));
  }
  return Status::Ok();
}

void Model::ZeroGrads() {
  for (ParamRef& r : ListParams(grads_)) be_.Zero(*r.tensor);
}

void Model::HeadForward(Head& head, const Tensor& hidden, const Tensor& norm_w) {
  be_.RmsNormForward(head.normed, head.rstd, hidden, norm_w, cfg_.rms_norm_eps);
  Linear(be_, head.logits, head.normed, params_.lm_head);  // (N, V)
  be_.CrossEntropyForward(head.losses, head.logits, head.targets);
}

void Model::HeadBackward(Head& head, const Tensor& hidden, const Tensor& norm_w, Tensor& norm_g, double weight,
                         Tensor& d_hidden, WeightGradQueue* defer) {
  be_.CrossEntropyBackward(head.logits, head.logits, head.targets, weight);  // logits become dlogits
  be_.Zero(d_normed_);
  LinearBackward(be_, d_normed_, grads_.lm_head, head.logits, head.normed, params_.lm_head, defer);
  be_.RmsNormBackward(d_hidden, norm_g, d_normed_, hidden, norm_w, head.rstd);
}

// Inputs and targets of every head this stage needs, from the windows.
Status Model::LoadTokens(Slot& slot, const int32_t* tokens, bool with_mtp) {
  const int b = shape_.batch, t = shape_.seq_len, win = window();
  const int heads = span_.last ? (with_mtp ? cfg_.num_nextn_predict_layers + 1 : 1) : 1;
  std::vector<int32_t> in(static_cast<size_t>(b) * t), tgt(in.size());
  for (int k = 0; k < heads; ++k) {
    int64_t valid = 0;
    for (int s = 0; s < b; ++s) {
      for (int i = 0; i < t; ++i) {
        const int32_t x = tokens[static_cast<size_t>(s) * win + k + i];
        const int32_t y = tokens[static_cast<size_t>(s) * win + k + i + 1];
        if (x >= cfg_.vocab_size || y >= cfg_.vocab_size) {
          return Status::InvalidArgument("token id " + std::to_string(std::max(x, y)) + " is outside the vocabulary (" +
                                         std::to_string(cfg_.vocab_size) + ")");
        }
        in[static_cast<size_t>(s) * t + i] = x < 0 ? 0 : x;
        tgt[static_cast<size_t>(s) * t + i] = (x < 0 || y < 0) ? -1 : y;
        valid += (x >= 0 && y >= 0);
      }
    }
    if (k == 0 && span_.first) be_.CopyFromHost(slot.embed_ids, in.data());
    if (span_.last) {
      be_.CopyFromHost(slot.heads[k].inputs, in.data());
      be_.CopyFromHost(slot.heads[k].targets, tgt.data());
      slot.heads[k].valid = valid;
    }
  }
  return Status::Ok();
}

Expected<StageLoss> Model::ForwardStage(int slot_index, const int32_t* tokens, const LossWeights& w, bool with_mtp) {
  Slot& s = slots_.at(slot_index);
  const int depth = cfg_.num_nextn_predict_layers, here = end_layer() - first_layer();
  weights_ = w;
  with_mtp = with_mtp && depth > 0 && span_.last;
  if (span_.first || span_.last) TROUPE_RETURN_IF_ERROR(LoadTokens(s, tokens, with_mtp));
  StageLoss loss;
  if (span_.first) be_.EmbeddingForward(s.resid[0], s.embed_ids, params_.embed);
  for (int i = 0; i < here; ++i) {
    LayerForward(be_, cfg_, params_.layers[first_layer() + i], s.acts[i], shape_, s.resid[i], s.resid[i + 1],
                 w.balance_alpha, expert_exchange_);
  }
  s.with_mtp = with_mtp;
  if (span_.last) {
    HeadForward(s.heads[0], s.resid[here], params_.final_norm);
    // MTP depths, each fed by the previous depth's hidden state.
    const int heads = with_mtp ? depth + 1 : 1;
    for (int k = 1; k < heads; ++k) {
      MtpActs& m = s.mtp[k - 1];
      const LayerParams& lp = params_.layers[cfg_.num_hidden_layers + k - 1];
      const Tensor& h_prev = k == 1 ? s.resid[here] : s.mtp[k - 2].out;
      be_.EmbeddingForward(m.emb, s.heads[k].inputs, params_.embed);
      be_.RmsNormForward(m.emb_normed, m.emb_rstd, m.emb, lp.enorm, cfg_.rms_norm_eps);
      be_.RmsNormForward(m.h_normed, m.h_rstd, h_prev, lp.hnorm, cfg_.rms_norm_eps);
      be_.ConcatCols(m.cat, m.emb_normed, m.h_normed);  // (N, 2d): embedding half first
      Linear(be_, m.layer_in, m.cat, lp.eh_proj);
      LayerForward(be_, cfg_, lp, s.acts[here + k - 1], shape_, m.layer_in, m.out, w.balance_alpha, expert_exchange_);
      HeadForward(s.heads[k], m.out, lp.head_norm);
    }
    // Losses, reduced on the host in double.
    loss.main_sum = be_.Sum(s.heads[0].losses);
    loss.main_valid = s.heads[0].valid;
    for (int k = 1; k < heads; ++k) {
      loss.mtp_sum.push_back(be_.Sum(s.heads[k].losses));
      loss.mtp_valid.push_back(s.heads[k].valid);
    }
  }
  const int run = here + (with_mtp ? depth : 0);
  for (int i = 0; i < run; ++i) {
    const int layer = i < here ? first_layer() + i : cfg_.num_hidden_layers + (i - here);
    if (params_.layers[layer].is_moe) loss.balance_sum += be_.Sum(s.acts[i].balance);
  }
  return loss;
}

BatchLoss BatchLossOf(const StageLoss& sums, int sequences, double mtp_lambda) {
  const double depth = static_cast<double>(sums.mtp_sum.size());
  BatchLoss loss;
  loss.main = sums.main_valid ? sums.main_sum / static_cast<double>(sums.main_valid) : 0.0;
  loss.tokens = sums.main_valid;
  loss.total = loss.main;
  for (size_t k = 0; k < sums.mtp_sum.size(); ++k) {
    loss.mtp.push_back(sums.mtp_valid[k] ? sums.mtp_sum[k] / static_cast<double>(sums.mtp_valid[k]) : 0.0);
    loss.total += mtp_lambda / depth * loss.mtp.back();
  }
  loss.balance = sums.balance_sum / sequences;
  loss.total += loss.balance;
  return loss;
}

LossScale LossScaleOf(const StageLoss& sums, int sequences, double mtp_lambda) {
  const double depth = static_cast<double>(sums.mtp_valid.size());
  LossScale scale;
  scale.main = sums.main_valid ? 1.0 / static_cast<double>(sums.main_valid) : 0.0;
  for (int64_t valid : sums.mtp_valid) scale.mtp.push_back(valid ? mtp_lambda / depth / valid : 0.0);
  scale.balance = 1.0 / sequences;
  return scale;
}

Expected<BatchLoss> Model::Forward(const int32_t* tokens, const LossWeights& w, bool with_mtp) {
  if (!span_.whole()) return Status::Internal("Model::Forward runs whole models only; stages use ForwardStage");
  TROUPE_ASSIGN_OR_RETURN(StageLoss s, ForwardStage(0, tokens, w, with_mtp));
  return BatchLossOf(s, shape_.batch, w.mtp_lambda);
}

void Model::Backward() {
  const Slot& s = slots_[0];
  StageLoss counts;  // the valid counts are all a scale needs
  counts.main_valid = s.heads[0].valid;
  if (s.with_mtp)
    for (int k = 1; k <= cfg_.num_nextn_predict_layers; ++k) counts.mtp_valid.push_back(s.heads[k].valid);
  BackwardStage(0, LossScaleOf(counts, shape_.batch, weights_.mtp_lambda));
}

// MTP depths, deepest first: each sends a gradient to the previous depth.
void Model::MtpBackward(Slot& s, const LossScale& scale, WeightGradQueue* defer) {
  const int depth = s.with_mtp ? cfg_.num_nextn_predict_layers : 0;
  const int layers = cfg_.num_hidden_layers, here = end_layer() - first_layer();
  for (int k = depth; k >= 1; --k) {
    MtpActs& m = s.mtp[k - 1];
    const LayerParams& lp = params_.layers[layers + k - 1];
    LayerParams& lg = grads_.layers[layers + k - 1];
    const Tensor& h_prev = k == 1 ? s.resid[here] : s.mtp[k - 2].out;
    HeadBackward(s.heads[k], m.out, lp.head_norm, lg.head_norm, scale.mtp.at(k - 1), d_hidden_[k], defer);
    be_.Zero(d_layer_in_);
    LayerBackward(be_, cfg_, lp, lg, s.acts[here + k - 1], scratch_, shape_, m.layer_in, d_hidden_[k], d_layer_in_,
                  weights_.balance_alpha, scale.balance, defer, expert_exchange_);
    be_.Zero(d_cat_);
    LinearBackward(be_, d_cat_, lg.eh_proj, d_layer_in_, m.cat, lp.eh_proj, defer);
    be_.Zero(d_en_);
    be_.Zero(d_hn_);
    be_.ConcatColsBackward(d_en_, d_hn_, d_cat_);
    be_.Zero(d_emb_);
    be_.RmsNormBackward(d_emb_, lg.enorm, d_en_, m.emb, lp.enorm, m.emb_rstd);
    be_.EmbeddingBackward(grads_.embed, d_emb_, s.heads[k].inputs);
    be_.RmsNormBackward(d_hidden_[k - 1], lg.hnorm, d_hn_, h_prev, lp.hnorm, m.h_rstd);
  }
}

void Model::BackwardStage(int slot_index, const LossScale& scale, WeightGradQueue* defer) {
  Slot& s = slots_.at(slot_index);
  const int here = end_layer() - first_layer();
  if (span_.last) {
    for (Tensor& d : d_hidden_) be_.Zero(d);
    MtpBackward(s, scale, defer);
    HeadBackward(s.heads[0], s.resid[here], params_.final_norm, grads_.final_norm, scale.main, d_hidden_[0], defer);
  }
  // Main layers in reverse; d_hidden_[0] holds d loss / d stage output.
  Tensor* d_out = &d_hidden_[0];
  Tensor* d_in = &d_resid_a_;
  for (int i = here - 1; i >= 0; --i) {
    be_.Zero(*d_in);
    const int layer = first_layer() + i;
    LayerBackward(be_, cfg_, params_.layers[layer], grads_.layers[layer], s.acts[i], scratch_, shape_, s.resid[i],
                  *d_out, *d_in, weights_.balance_alpha, scale.balance, defer, expert_exchange_);
    d_out = d_in;
    d_in = (d_in == &d_resid_a_) ? &d_resid_b_ : &d_resid_a_;
  }
  if (span_.first) be_.EmbeddingBackward(grads_.embed, *d_out, s.embed_ids);
  d_input_ = d_out;
}

std::vector<std::vector<int64_t>> Model::ExpertLoads(int slot_index) {
  const Slot& s = slots_.at(slot_index);
  const int here = end_layer() - first_layer();
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < s.acts.size(); ++i) {
    const int layer = static_cast<int>(i) < here ? first_layer() + static_cast<int>(i)
                                                 : cfg_.num_hidden_layers + (static_cast<int>(i) - here);
    if (!params_.layers[layer].is_moe) continue;
    std::vector<double> v = ToHostDoubles(be_, s.acts[i].load);
    out.emplace_back(v.begin(), v.end());
  }
  return out;
}

std::vector<std::vector<float>> Model::RoutingBiases() {
  std::vector<std::vector<float>> out;
  for (LayerParams& l : params_.layers) {
    if (l.is_moe && l.moe.bias.defined()) out.push_back(ToHostFloats(be_, l.moe.bias));
  }
  return out;
}

void Model::SetRoutingBiases(const std::vector<std::vector<float>>& biases) {
  size_t i = 0;
  for (LayerParams& l : params_.layers) {
    if (l.is_moe && l.moe.bias.defined() && i < biases.size()) FromHostFloats(be_, l.moe.bias, biases[i++]);
  }
}

}  // namespace troupe
