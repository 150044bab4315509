#include "gpu/model/decode.h"

#include <cmath>

#include "gpu/host_io.h"

namespace troupe {
namespace {

// y[r] = sum_c w[(row0 + r) * cols + c] * x[c], r < rows.
void MatVec(const std::vector<double>& w, int64_t row0, int64_t rows, int64_t cols, const double* x, double* y) {
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    const double* wr = &w[(row0 + r) * cols];
    for (int64_t c = 0; c < cols; ++c) s += wr[c] * x[c];
    y[r] = s;
  }
}

void RmsNorm(std::vector<double>& x, const std::vector<double>& w, double eps) {
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double rstd = 1.0 / std::sqrt(ss / x.size() + eps);
  for (size_t i = 0; i < x.size(); ++i) x[i] = x[i] * rstd * w[i];
}

void Rope(double* x, int dim, int pos, double theta) {
  for (int j = 0; j < dim / 2; ++j) {
    const double angle = pos * std::pow(theta, -2.0 * j / dim);
    const double c = std::cos(angle), s = std::sin(angle);
    const double a = x[2 * j], b = x[2 * j + 1];
    x[2 * j] = a * c - b * s;
    x[2 * j + 1] = a * s + b * c;
  }
}

}  // namespace

Expected<std::unique_ptr<MlaDecoder>> MlaDecoder::Create(Model& model, int max_len) {
  std::unique_ptr<MlaDecoder> d(new MlaDecoder(model));
  Backend& be = model.backend();
  const ModelConfig& c = model.config();
  ModelParams& p = model.params();
  const DType dtype = p.embed.dtype();
  d->latent_ = c.kv_lora_rank;
  d->rope_ = c.qk_rope_head_dim;
  d->max_len_ = max_len;
  const BatchShape one{1, 1};
  d->layers_.resize(c.num_hidden_layers);
  d->acts_.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const MlaParams& a = p.layers[l].attn;
    LayerCache& lc = d->layers_[l];
    lc.q_a = ToHostDoubles(be, a.q_a);
    lc.q_a_norm = ToHostDoubles(be, a.q_a_norm);
    lc.q_b = ToHostDoubles(be, a.q_b);
    lc.kv_a = ToHostDoubles(be, a.kv_a);
    lc.kv_a_norm = ToHostDoubles(be, a.kv_a_norm);
    lc.kv_b = ToHostDoubles(be, a.kv_b);
    lc.o = ToHostDoubles(be, a.o);
    lc.entries.reserve(static_cast<size_t>(max_len) * (d->latent_ + d->rope_));
    TROUPE_RETURN_IF_ERROR(AllocateLayerActs(be, c, p.layers[l], one, dtype, d->acts_[l]));
  }
  const int64_t dm = c.hidden_size;
  TROUPE_ASSIGN_OR_RETURN(d->x_, be.Alloc({1, dm}, dtype, "decode.x"));
  TROUPE_ASSIGN_OR_RETURN(d->normed_, be.Alloc({1, dm}, dtype, "decode.normed"));
  TROUPE_ASSIGN_OR_RETURN(d->rstd_, be.Alloc({1}, dtype, "decode.rstd"));
  TROUPE_ASSIGN_OR_RETURN(d->logits_, be.Alloc({1, c.vocab_size}, dtype, "decode.logits"));
  TROUPE_ASSIGN_OR_RETURN(d->token_, be.Alloc({1}, DType::kI32, "decode.token"));
  return d;
}

int64_t MlaDecoder::cache_numbers() const {
  int64_t n = 0;
  for (const LayerCache& l : layers_) n += static_cast<int64_t>(l.entries.size());
  return n;
}

void MlaDecoder::Attend(LayerCache& lc, const std::vector<double>& x, std::vector<double>& out) {
  const ModelConfig& c = model_.config();
  const int64_t d = c.hidden_size, dcq = c.q_lora_rank, dc = latent_, dr = rope_;
  const int64_t nh = c.num_attention_heads, dh = c.qk_nope_head_dim, dv = c.v_head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh + dr));
  // Query: latent, norm, per-head content and rotary parts.
  std::vector<double> cq(dcq), q(nh * (dh + dr));
  MatVec(lc.q_a, 0, dcq, d, x.data(), cq.data());
  RmsNorm(cq, lc.q_a_norm, c.rms_norm_eps);
  MatVec(lc.q_b, 0, nh * (dh + dr), dcq, cq.data(), q.data());
  for (int64_t i = 0; i < nh; ++i) Rope(&q[i * (dh + dr) + dh], static_cast<int>(dr), pos_, c.rope_theta);
  // The new cache entry: normed latent, then the rotated shared key.
  std::vector<double> ckv(dc), kr(dr);
  MatVec(lc.kv_a, 0, dc, d, x.data(), ckv.data());
  RmsNorm(ckv, lc.kv_a_norm, c.rms_norm_eps);
  MatVec(lc.kv_a, dc, dr, d, x.data(), kr.data());
  Rope(kr.data(), static_cast<int>(dr), pos_, c.rope_theta);
  lc.entries.insert(lc.entries.end(), ckv.begin(), ckv.end());
  lc.entries.insert(lc.entries.end(), kr.begin(), kr.end());
  const int64_t len = pos_ + 1, stride = dc + dr;
  std::vector<double> heads(nh * dv), q_abs(dc), score(len), latent(dc);
  for (int64_t i = 0; i < nh; ++i) {
    const double* qc = &q[i * (dh + dr)];
    const double* qr = qc + dh;
    // q' = W_UK,i^T q_c,i: the key up-projection absorbed into the query.
    for (int64_t k = 0; k < dc; ++k) {
      double s = 0.0;
      for (int64_t r = 0; r < dh; ++r) s += qc[r] * lc.kv_b[(i * (dh + dv) + r) * dc + k];
      q_abs[k] = s;
    }
    double max_score = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      const double* e = &lc.entries[j * stride];
      double s = 0.0;
      for (int64_t k = 0; k < dc; ++k) s += q_abs[k] * e[k];
      for (int64_t k = 0; k < dr; ++k) s += qr[k] * e[dc + k];
      score[j] = s * scale;
      max_score = std::max(max_score, score[j]);
    }
    double z = 0.0;
    for (int64_t j = 0; j < len; ++j) z += (score[j] = std::exp(score[j] - max_score));
    std::fill(latent.begin(), latent.end(), 0.0);
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t k = 0; k < dc; ++k) latent[k] += score[j] / z * lc.entries[j * stride + k];
    }
    // W_UV,i applied once to the weighted latent.
    MatVec(lc.kv_b, i * (dh + dv) + dh, dv, dc, latent.data(), &heads[i * dv]);
  }
  out.assign(d, 0.0);
  MatVec(lc.o, 0, d, nh * dv, heads.data(), out.data());
}

Expected<std::vector<double>> MlaDecoder::Step(int32_t token) {
  const ModelConfig& c = model_.config();
  if (pos_ >= max_len_) return Status::InvalidArgument("decoder: the cache holds at most " + std::to_string(max_len_) + " tokens");
  if (token < 0 || token >= c.vocab_size) return Status::InvalidArgument("decoder: token id " + std::to_string(token) + " is outside the vocabulary");
  Backend& be = model_.backend();
  ModelParams& p = model_.params();
  be.CopyFromHost(token_, &token);
  be.EmbeddingForward(x_, token_, p.embed);
  std::vector<double> attn;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerActs& a = acts_[l];
    const LayerParams& lp = p.layers[l];
    be.RmsNormForward(a.ln1, a.rstd1, x_, lp.input_norm, c.rms_norm_eps);
    Attend(layers_[l], ToHostDoubles(be, a.ln1), attn);
    std::vector<double> h1 = ToHostDoubles(be, x_);
    for (size_t i = 0; i < h1.size(); ++i) h1[i] += attn[i];
    FromHostDoubles(be, a.h1, h1);
    be.RmsNormForward(a.ln2, a.rstd2, a.h1, lp.post_norm, c.rms_norm_eps);
    FfnForward(be, c, lp, a, BatchShape{1, 1}, 0.0);
    be.Add(x_, a.h1, a.ffn);
  }
  be.RmsNormForward(normed_, rstd_, x_, p.final_norm, c.rms_norm_eps);
  be.Matmul(logits_, normed_, p.lm_head, false, true, 1.0, 0.0);
  ++pos_;
  return ToHostDoubles(be, logits_);
}

}  // namespace troupe
