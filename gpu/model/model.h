// Model: the DeepSeek-V3-style network with its losses (BRIEF §1), whole or
// one pipeline stage of it (a StageSpan: some main layers, the embedding on
// the first stage, the heads and MTP modules on the last).
//
// Each sequence of a batch is a window of T + 1 + D token ids x[0 .. T+D]:
// the main head reads x[0, T) and predicts x[1, T]; MTP depth k reads
// embeddings of x[k, k+T) and predicts x[k+1, k+1+T). The total loss is
//   L = L_main + mtp_lambda / D * sum_k L_k + sum over MoE layers of
//       (1/B) sum_sequences alpha * sum_i f_i P_i.
// A Model is built for one batch shape; activations live as long as it does,
// one set per slot (micro-batch in flight).
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
  double total = 0;         // what backward differentiates
  double main = 0;          // mean next-token cross-entropy of the main head
  std::vector<double> mtp;  // per depth
  double balance = 0;       // sum over MoE layers
  int64_t tokens = 0;       // predicted positions of the main head (ignored ones excluded)
};

// What one forward of a pipeline stage adds to the batch's loss, as sums, so
// that micro-batches and stages add up to the whole batch's BatchLoss.
struct StageLoss {
  double main_sum = 0;  // last stage: summed main-head cross-entropy
  int64_t main_valid = 0;
  std::vector<double> mtp_sum;  // last stage, per depth
  std::vector<int64_t> mtp_valid;
  double balance_sum = 0;  // this stage's MoE layers, summed over sequences
};

// d(total loss) / d(each sum of StageLoss): how the batch normalises them.
// For a whole batch of B sequences: main = 1 / valid, mtp_k = lambda / D /
// valid_k, balance = 1 / B (valid counts and B of the whole global batch).
struct LossScale {
  double main = 0;
  std::vector<double> mtp;
  double balance = 0;
};

// The one normalisation of a batch's summed losses, whole model or pipeline:
// `sums` holds the batch's totals (main and per-depth sums with their valid
// counts, the balance sum); `sequences` is the batch's sequence count.
BatchLoss BatchLossOf(const StageLoss& sums, int sequences, double mtp_lambda);
LossScale LossScaleOf(const StageLoss& sums, int sequences, double mtp_lambda);

class Model {
 public:
  // Allocates parameters (zeroed: load or InitParams next), gradients and
  // activations for batches of `batch` x `seq_len`. A pipeline stage holds
  // `span` of the network and keeps `slots` micro-batches' activations at
  // once (the micro-batches in flight between their forward and backward).
  static Expected<std::unique_ptr<Model>> Create(Backend& be, const ModelConfig& cfg, DType dtype, int batch,
                                                 int seq_len, StageSpan span = {}, int slots = 1);

  const ModelConfig& config() const { return cfg_; }
  BatchShape shape() const { return shape_; }
  const StageSpan& span() const { return span_; }
  int slots() const { return static_cast<int>(slots_.size()); }
  int window() const { return shape_.seq_len + 1 + cfg_.num_nextn_predict_layers; }  // tokens per sequence
  ModelParams& params() { return params_; }
  ModelParams& grads() { return grads_; }
  Backend& backend() { return be_; }

  // Whole model only. tokens: host int32 [batch, window()]; a negative id
  // marks a position whose prediction is ignored (padding). `with_mtp` =
  // false runs the main model only (evaluation). Fails on token ids outside
  // [0, vocab_size).
  Expected<BatchLoss> Forward(const int32_t* tokens, const LossWeights& w, bool with_mtp = true);
  // grads += dL/dparams of the last Forward (which must have had with_mtp
  // = true when D > 0). Destroys the saved logits.
  void Backward();
  void ZeroGrads();

  // ---- pipeline stages (BRIEF §2) -------------------------------------
  // Forward of one micro-batch into activation slot `slot`. The first stage
  // embeds `tokens`; any other reads StageInput(slot), which the caller has
  // filled. The first and last stages read `tokens` ([batch, window()]).
  Expected<StageLoss> ForwardStage(int slot, const int32_t* tokens, const LossWeights& w, bool with_mtp = true);
  Tensor& StageInput(int slot) { return slots_[slot].resid.front(); }
  // Output hidden state [N, d] of the slot's last forward (not the last stage).
  const Tensor& StageOutput(int slot) const { return slots_[slot].resid.back(); }
  // Backward of the micro-batch in `slot`: grads += its contribution. The
  // last stage starts from its losses, weighted by `scale`; any other from
  // OutputGrad(), which the caller has filled. Not the first stage: the
  // gradient w.r.t. the stage input is then in InputGrad() until the next
  // backward. With `defer`, the matrices' weight gradients wait in the
  // queue (the slot's activations must then live until it has run).
  void BackwardStage(int slot, const LossScale& scale, WeightGradQueue* defer = nullptr);
  Tensor& OutputGrad() { return d_hidden_[0]; }
  const Tensor& InputGrad() const { return *d_input_; }

  // Expert parallelism (span.ep > 1): how this stage's MoE layers reach the
  // other ranks' experts. Must be set before the first forward; not owned.
  void SetExpertExchange(ExpertExchange* ex) { expert_exchange_ = ex; }

  // Main-head logits [N, V] of the last Forward (valid until Backward).
  const Tensor& logits() const { return slots_[0].heads[0].logits; }
  // Tokens per routed expert in the slot's last forward, one vector per MoE
  // layer this model holds (in layer order, MTP layers last).
  std::vector<std::vector<int64_t>> ExpertLoads(int slot = 0);
  // Routing biases <-> host, one vector per held MoE layer, same order.
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
  // Everything one micro-batch in flight keeps from its forward to its backward.
  struct Slot {
    Tensor embed_ids;             // first stage: I32 [N] main-model input ids
    std::vector<Tensor> resid;    // [layers here + 1] x [N, d]; resid[0] = stage input
    std::vector<LayerActs> acts;  // main layers here, then (last stage) the D MTP layers
    std::vector<Head> heads;      // last stage: 1 + D
    std::vector<MtpActs> mtp;     // last stage: D
    bool with_mtp = false;
  };

  Model(Backend& be, const ModelConfig& cfg, BatchShape shape, StageSpan span);
  Status Allocate(DType dtype, int slots);
  Status AllocateSlot(DType dtype, Slot& slot);
  int first_layer() const { return span_.first_layer; }
  int end_layer() const { return span_.end_layer < 0 ? cfg_.num_hidden_layers : span_.end_layer; }
  Status LoadTokens(Slot& slot, const int32_t* tokens, bool with_mtp);
  void HeadForward(Head& head, const Tensor& hidden, const Tensor& norm_w);
  void HeadBackward(Head& head, const Tensor& hidden, const Tensor& norm_w, Tensor& norm_g, double weight,
                    Tensor& d_hidden, WeightGradQueue* defer);
  void MtpBackward(Slot& slot, const LossScale& scale, WeightGradQueue* defer);

  Backend& be_;
  ModelConfig cfg_;
  BatchShape shape_;
  StageSpan span_;
  DType dtype_ = DType::kF32;
  ModelParams params_, grads_;
  std::vector<Slot> slots_;
  LayerScratch scratch_;
  std::vector<Tensor> d_hidden_;     // gradients flowing between depths: [D+1] x [N, d]
  Tensor d_resid_a_, d_resid_b_;     // [N, d] ping-pong through the main layers
  Tensor d_normed_, d_emb_;          // [N, d] head and embedding gradients
  Tensor d_layer_in_, d_en_, d_hn_;  // [N, d] MTP module gradients
  Tensor d_cat_;                     // [N, 2d]
  const Tensor* d_input_ = nullptr;  // after BackwardStage: d loss / d stage input
  LossWeights weights_;
  ExpertExchange* expert_exchange_ = nullptr;
};

}  // namespace troupe
