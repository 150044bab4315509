// Incremental decoding with MLA's compressed KV cache (BRIEF §1).
//
// Per layer and token the cache keeps only c_kv (d_c numbers, after its norm)
// and k_r (d_r numbers, after RoPE), instead of 2 * n_h * d_h. Attention runs
// in the absorbed form: W_UK is folded into the query (q' = W_UK,i^T q_c,i,
// scored directly against the cached latents) and W_UV is applied once to the
// probability-weighted sum of latents. The main head's logits equal those of
// a full causal forward over the same prefix.
#pragma once

#include <vector>

#include "gpu/model/model.h"

namespace troupe {

class MlaDecoder {
 public:
  // Decodes with `model`'s parameters (and routing biases) on its backend.
  static Expected<std::unique_ptr<MlaDecoder>> Create(Model& model, int max_len);

  // Feeds the token at the next position; returns the main head's logits [V].
  Expected<std::vector<double>> Step(int32_t token);
  int position() const { return pos_; }
  // Numbers cached per token and main layer: d_c + d_r.
  int64_t cache_numbers_per_token() const { return latent_ + rope_; }
  // Numbers held by the cache now, over all main layers.
  int64_t cache_numbers() const;

 private:
  struct LayerCache {
    std::vector<double> q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o;  // host copies of the weights
    std::vector<double> entries;  // [pos, d_c + d_r]: c_kv then k_r per token
  };
  explicit MlaDecoder(Model& model) : model_(model) {}
  void Attend(LayerCache& c, const std::vector<double>& x, std::vector<double>& out);

  Model& model_;
  std::vector<LayerCache> layers_;
  std::vector<LayerActs> acts_;  // N = 1 activations for the FFN half
  Tensor x_, h_, normed_, rstd_, logits_, token_;
  int latent_ = 0, rope_ = 0, max_len_ = 0, pos_ = 0;
};

}  // namespace troupe
