// Model: the whole DeepSeek-V3-style network with its losses (BRIEF §1).
//
// Each sequence of a batch is a window of T + 1 + D token ids x[0 .. T+D]:
// the main head reads x[0, T) and predicts x[1, T]; MTP depth k reads
// embeddings of x[k, k+T) and predicts x[k+1, k+1+T). The total loss is
//   L = L_main + mtp_lambda / D * sum_k L_k + sum over MoE layers of
//       (1/B) sum_sequences alpha * sum_i f_i P_i.
// A Model is built for one batch shape; activations live as long as it does.
#pragma once

#include <memory>
#include <vector>

#include "configs/config.h"
#include "gpu/backend.h"
#include "gpu/model/layer.h"
#include "gpu/model/params.h"

namespace troupe {

struct LossWeights {
  double mtp_lambda = 0.3;
  double balance_alpha = 1e-4;
};

struct BatchLoss {
  double total = 0;    // what backward differentiates
  double main = 0;     // mean next-token cross-entropy of the main head
  std::vector<double> mtp;  // per depth
  double balance = 0;  // sum over MoE layers
  int64_t tokens = 0;  // predicted positions of the main head (ignored ones excluded)
};

class Model {
 public:
  // Allocates parameters (zeroed: load or InitParams next), gradients and
  // activations for batches of `batch` x `seq_len`.
  static Expected<std::unique_ptr<Model>> Create(Backend& be, const ModelConfig& cfg, DType dtype, int batch,
                                                 int seq_len);

  const ModelConfig& config() const { return cfg_; }
  BatchShape shape() const { return shape_; }
  int window() const { return shape_.seq_len + 1 + cfg_.num_nextn_predict_layers; }  // tokens per sequence
  ModelParams& params() { return params_; }
  ModelParams& grads() { return grads_; }
  Backend& backend() { return be_; }

  // tokens: host int32 [batch, window()]; a negative id marks a position
  // whose prediction is ignored (padding). `with_mtp` = false runs the main
  // model only (evaluation). Fails on token ids outside [0, vocab_size).
  Expected<BatchLoss> Forward(const int32_t* tokens, const LossWeights& w, bool with_mtp = true);
  // grads += dL/dparams of the last Forward (which must have had with_mtp
  // = true when D > 0). Destroys the saved logits.
  void Backward();
  void ZeroGrads();

  // Main-head logits [N, V] of the last Forward (valid until Backward).
  const Tensor& logits() const { return heads_[0].logits; }
  // Tokens per routed expert in the last Forward, one vector per MoE layer
  // (in layer order, MTP layers last).
  std::vector<std::vector<int64_t>> ExpertLoads();
  // Routing biases <-> host, one vector per MoE layer, same order.
  std::vector<std::vector<float>> RoutingBiases();
  void SetRoutingBiases(const std::vector<std::vector<float>>& biases);

 private:
  // One output head: the main one (depth 0) or MTP depth k.
  struct Head {
    Tensor inputs, targets;  // I32 [N]
    Tensor normed, rstd;     // [N, d], [N]
    Tensor logits, losses;   // [N, V], [N]
    int64_t valid = 0;       // targets that count
  };
  // Activations specific to an MTP module (its layer has its own LayerActs).
  struct MtpActs {
    Tensor emb, emb_normed, emb_rstd;  // [N, d] x2, [N]
    Tensor h_normed, h_rstd;           // [N, d], [N]
    Tensor cat;                        // [N, 2d]
    Tensor layer_in, out;              // [N, d]
  };

  Model(Backend& be, const ModelConfig& cfg, BatchShape shape);
  Status Allocate(DType dtype);
  void HeadForward(Head& head, const Tensor& hidden, const Tensor& norm_w);
  void HeadBackward(Head& head, const Tensor& hidden, const Tensor& norm_w, Tensor& norm_g, double weight,
                    Tensor& d_hidden);

  Backend& be_;
  ModelConfig cfg_;
  BatchShape shape_;
  DType dtype_ = DType::kF32;
  ModelParams params_, grads_;
  std::vector<Tensor> resid_;       // [L+1] x [N, d]; resid_[0] = embeddings
  std::vector<LayerActs> acts_;     // L + D
  LayerScratch scratch_;
  std::vector<Head> heads_;         // 1 + D
  std::vector<MtpActs> mtp_;        // D
  std::vector<Tensor> d_hidden_;    // gradients flowing between depths: [D+1] x [N, d]
  Tensor d_resid_a_, d_resid_b_;    // [N, d] ping-pong through the main layers
  Tensor d_normed_, d_emb_;         // [N, d] head and embedding gradients
  Tensor d_layer_in_, d_en_, d_hn_; // [N, d] MTP module gradients
  Tensor d_cat_;                    // [N, 2d]
  LossWeights weights_;
  bool have_mtp_forward_ = false;
};

}  // namespace troupe
