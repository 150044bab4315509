#include "gpu/model/model.h"

#include <string>

#include "gpu/host_io.h"
#include "gpu/model/linear.h"

namespace troupe {
namespace {

}  // namespace

Model::Model(Backend& be, const ModelConfig& cfg, BatchShape shape) : be_(be), cfg_(cfg), shape_(shape) {}

Expected<std::unique_ptr<Model>> Model::Create(Backend& be, const ModelConfig& cfg, DType dtype, int batch,
                                               int seq_len) {
  if (batch < 1 || seq_len < 1) return Status::InvalidArgument("model: batch and seq_len must be positive");
  std::unique_ptr<Model> m(new Model(be, cfg, BatchShape{batch, seq_len}));
  TROUPE_RETURN_IF_ERROR(m->Allocate(dtype));
  return m;
}

Status Model::Allocate(DType dtype) {
  dtype_ = dtype;
  TROUPE_ASSIGN_OR_RETURN(params_, AllocateParams(be_, cfg_, dtype));
  TROUPE_ASSIGN_OR_RETURN(grads_, AllocateParams(be_, cfg_, dtype));
  const int64_t n = shape_.tokens(), d = cfg_.hidden_size, v = cfg_.vocab_size;
  const int depth = cfg_.num_nextn_predict_layers, layers = cfg_.num_hidden_layers;
  auto make = [&](Tensor& t, std::vector<int64_t> shape, const std::string& name, DType dt) -> Status {
    TROUPE_ASSIGN_OR_RETURN(t, be_.Alloc(std::move(shape), dt, name));
    return Status::Ok();
  };
  resid_.resize(layers + 1);
  for (int l = 0; l <= layers; ++l) TROUPE_RETURN_IF_ERROR(make(resid_[l], {n, d}, "act.residual", dtype));
  acts_.resize(layers + depth);
  for (int l = 0; l < layers + depth; ++l) {
    TROUPE_RETURN_IF_ERROR(AllocateLayerActs(be_, cfg_, params_.layers[l], shape_, dtype, acts_[l]));
  }
  TROUPE_RETURN_IF_ERROR(AllocateLayerScratch(be_, cfg_, shape_, dtype, scratch_));
  heads_.resize(1 + depth);
  d_hidden_.resize(1 + depth);
  for (int k = 0; k <= depth; ++k) {
    Head& h = heads_[k];
    TROUPE_RETURN_IF_ERROR(make(h.inputs, {n}, "act.head_inputs", DType::kI32));
    TROUPE_RETURN_IF_ERROR(make(h.targets, {n}, "act.head_targets", DType::kI32));
    TROUPE_RETURN_IF_ERROR(make(h.normed, {n, d}, "act.head_normed", dtype));
    TROUPE_RETURN_IF_ERROR(make(h.rstd, {n}, "act.head_rstd", dtype));
    TROUPE_RETURN_IF_ERROR(make(h.logits, {n, v}, "act.logits", dtype));
    TROUPE_RETURN_IF_ERROR(make(h.losses, {n}, "act.losses", dtype));
    TROUPE_RETURN_IF_ERROR(make(d_hidden_[k], {n, d}, "grad.hidden", dtype));
  }
  mtp_.resize(depth);
  for (MtpActs& m : mtp_) {
    TROUPE_RETURN_IF_ERROR(make(m.emb, {n, d}, "act.mtp_emb", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.emb_normed, {n, d}, "act.mtp_emb_normed", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.emb_rstd, {n}, "act.mtp_emb_rstd", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.h_normed, {n, d}, "act.mtp_h_normed", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.h_rstd, {n}, "act.mtp_h_rstd", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.cat, {n, 2 * d}, "act.mtp_cat", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.layer_in, {n, d}, "act.mtp_layer_in", dtype));
    TROUPE_RETURN_IF_ERROR(make(m.out, {n, d}, "act.mtp_out", dtype));
  }
  TROUPE_RETURN_IF_ERROR(make(d_resid_a_, {n, d}, "grad.residual_a", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_resid_b_, {n, d}, "grad.residual_b", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_normed_, {n, d}, "grad.head_normed", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_emb_, {n, d}, "grad.embedding", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_layer_in_, {n, d}, "grad.mtp_layer_in", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_en_, {n, d}, "grad.mtp_emb_normed", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_hn_, {n, d}, "grad.mtp_h_normed", dtype));
  TROUPE_RETURN_IF_ERROR(make(d_cat_, {n, 2 * d}, "grad.mtp_cat", dtype));
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
                         Tensor& d_hidden) {
  be_.CrossEntropyBackward(head.logits, head.logits, head.targets, weight);  // logits become dlogits
  be_.Zero(d_normed_);
  LinearBackward(be_, d_normed_, grads_.lm_head, head.logits, head.normed, params_.lm_head);
  be_.RmsNormBackward(d_hidden, norm_g, d_normed_, hidden, norm_w, head.rstd);
}

Expected<BatchLoss> Model::Forward(const int32_t* tokens, const LossWeights& w, bool with_mtp) {
  const int b = shape_.batch, t = shape_.seq_len, win = window(), depth = cfg_.num_nextn_predict_layers;
  const int layers = cfg_.num_hidden_layers;
  weights_ = w;
  with_mtp = with_mtp && depth > 0;
  // Inputs and targets of every head, from the windows.
  const int heads = with_mtp ? depth + 1 : 1;
  std::vector<int32_t> in(static_cast<size_t>(b) * t), tgt(in.size());
  BatchLoss loss;
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
    be_.CopyFromHost(heads_[k].inputs, in.data());
    be_.CopyFromHost(heads_[k].targets, tgt.data());
    heads_[k].valid = valid;
  }
  // Main model.
  be_.EmbeddingForward(resid_[0], heads_[0].inputs, params_.embed);
  for (int l = 0; l < layers; ++l) {
    LayerForward(be_, cfg_, params_.layers[l], acts_[l], shape_, resid_[l], resid_[l + 1], w.balance_alpha);
  }
  HeadForward(heads_[0], resid_[layers], params_.final_norm);
  // MTP depths, each fed by the previous depth's hidden state.
  for (int k = 1; k < heads; ++k) {
    MtpActs& m = mtp_[k - 1];
    const LayerParams& lp = params_.layers[layers + k - 1];
    const Tensor& h_prev = k == 1 ? resid_[layers] : mtp_[k - 2].out;
    be_.EmbeddingForward(m.emb, heads_[k].inputs, params_.embed);
    be_.RmsNormForward(m.emb_normed, m.emb_rstd, m.emb, lp.enorm, cfg_.rms_norm_eps);
    be_.RmsNormForward(m.h_normed, m.h_rstd, h_prev, lp.hnorm, cfg_.rms_norm_eps);
    be_.ConcatCols(m.cat, m.emb_normed, m.h_normed);  // (N, 2d): embedding half first
    Linear(be_, m.layer_in, m.cat, lp.eh_proj);
    LayerForward(be_, cfg_, lp, acts_[layers + k - 1], shape_, m.layer_in, m.out, w.balance_alpha);
    HeadForward(heads_[k], m.out, lp.head_norm);
  }
  have_mtp_forward_ = with_mtp;
  // Losses, reduced on the host in double.
  auto mean = [&](const Head& h) { return h.valid ? be_.Sum(h.losses) / static_cast<double>(h.valid) : 0.0; };
  loss.main = mean(heads_[0]);
  loss.tokens = heads_[0].valid;
  loss.total = loss.main;
  for (int k = 1; k < heads; ++k) {
    loss.mtp.push_back(mean(heads_[k]));
    loss.total += w.mtp_lambda / depth * loss.mtp.back();
  }
  const int run_layers = layers + (with_mtp ? depth : 0);
  for (int l = 0; l < run_layers; ++l) {
    if (params_.layers[l].is_moe) loss.balance += be_.Sum(acts_[l].balance) / b;
  }
  loss.total += loss.balance;
  return loss;
}

void Model::Backward() {
  const int depth = have_mtp_forward_ ? cfg_.num_nextn_predict_layers : 0;
  const int layers = cfg_.num_hidden_layers;
  const double balance_dloss = 1.0 / shape_.batch;
  for (Tensor& d : d_hidden_) be_.Zero(d);
  // MTP depths, deepest first: each sends a gradient to the previous depth.
  for (int k = depth; k >= 1; --k) {
    MtpActs& m = mtp_[k - 1];
    const LayerParams& lp = params_.layers[layers + k - 1];
    LayerParams& lg = grads_.layers[layers + k - 1];
    const Tensor& h_prev = k == 1 ? resid_[layers] : mtp_[k - 2].out;
    const double weight = heads_[k].valid ? weights_.mtp_lambda / depth / heads_[k].valid : 0.0;
    HeadBackward(heads_[k], m.out, lp.head_norm, lg.head_norm, weight, d_hidden_[k]);
    be_.Zero(d_layer_in_);
    LayerBackward(be_, cfg_, lp, lg, acts_[layers + k - 1], scratch_, shape_, m.layer_in, d_hidden_[k], d_layer_in_,
                  weights_.balance_alpha, balance_dloss);
    be_.Zero(d_cat_);
    LinearBackward(be_, d_cat_, lg.eh_proj, d_layer_in_, m.cat, lp.eh_proj);
    be_.Zero(d_en_);
    be_.Zero(d_hn_);
    be_.ConcatColsBackward(d_en_, d_hn_, d_cat_);
    be_.Zero(d_emb_);
    be_.RmsNormBackward(d_emb_, lg.enorm, d_en_, m.emb, lp.enorm, m.emb_rstd);
    be_.EmbeddingBackward(grads_.embed, d_emb_, heads_[k].inputs);
    be_.RmsNormBackward(d_hidden_[k - 1], lg.hnorm, d_hn_, h_prev, lp.hnorm, m.h_rstd);
  }
  // Main head, then the main layers in reverse.
  const double main_weight = heads_[0].valid ? 1.0 / heads_[0].valid : 0.0;
  HeadBackward(heads_[0], resid_[layers], params_.final_norm, grads_.final_norm, main_weight, d_hidden_[0]);
  Tensor* d_out = &d_hidden_[0];
  Tensor* d_in = &d_resid_a_;
  for (int l = layers - 1; l >= 0; --l) {
    be_.Zero(*d_in);
    LayerBackward(be_, cfg_, params_.layers[l], grads_.layers[l], acts_[l], scratch_, shape_, resid_[l], *d_out,
                  *d_in, weights_.balance_alpha, balance_dloss);
    d_out = d_in;
    d_in = (d_in == &d_resid_a_) ? &d_resid_b_ : &d_resid_a_;
  }
  be_.EmbeddingBackward(grads_.embed, *d_out, heads_[0].inputs);
}

std::vector<std::vector<int64_t>> Model::ExpertLoads() {
  std::vector<std::vector<int64_t>> out;
  for (size_t l = 0; l < params_.layers.size(); ++l) {
    if (!params_.layers[l].is_moe) continue;
    std::vector<double> v = ToHostDoubles(be_, acts_[l].load);
    out.emplace_back(v.begin(), v.end());
  }
  return out;
}

std::vector<std::vector<float>> Model::RoutingBiases() {
  std::vector<std::vector<float>> out;
  for (LayerParams& l : params_.layers) {
    if (l.is_moe) out.push_back(ToHostFloats(be_, l.moe.bias));
  }
  return out;
}

void Model::SetRoutingBiases(const std::vector<std::vector<float>>& biases) {
  size_t i = 0;
  for (LayerParams& l : params_.layers) {
    if (l.is_moe && i < biases.size()) FromHostFloats(be_, l.moe.bias, biases[i++]);
  }
}

}  // namespace troupe
