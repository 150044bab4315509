// Trainer: one process, one backend, the whole training loop of `troupe train`.
//
// Each Step(): next batch -> forward -> backward -> global-norm clip ->
// AdamW -> auxiliary-loss-free bias update. Everything that decides a
// number is seeded from the config, so the loss sequence is bitwise
// reproducible on the CPU backend whatever the thread count.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>

#include "common/status.h"
#include "configs/config.h"
#include "data/loader.h"
#include "gpu/backend.h"
#include "gpu/model/model.h"
#include "storage/checkpoint/checkpoint_io.h"

namespace troupe {

struct StepReport {
  int step = 0;  // 1-based, after this step
  BatchLoss loss;
  double lr = 0;
  double grad_norm = 0;       // before clipping
  double seconds = 0;         // wall time of the step
  int64_t tokens = 0;         // tokens in the batch (B * T)
  double max_load_ratio = 0;  // max over MoE layers of max_i load_i / mean load
};

// What a checkpoint's manifest keeps of the step it was taken after: the
// losses, lr, grad norm and tokens/s, and the latest validation loss if any.
std::map<std::string, double> CheckpointMetrics(const StepReport& step, std::optional<double> val_loss);

// The job's training loader (seeded order) and validation loader (fixed
// order), over its shards; a clear Status on missing or bad shards.
Status OpenJobLoaders(const JobConfig& job, std::unique_ptr<data::TokenLoader>* train,
                      std::unique_ptr<data::TokenLoader>* val);

// Whether a checkpoint's run state can continue this job: the same seed
// (it orders the data), a step in range, both loaders' positions present.
Status CheckResumable(const ckpt::RunState& saved, const JobConfig& job);
// Moves both loaders to the positions `saved` holds, or neither (a position
// these shards do not have is an error naming it).
Status SetLoaderPositions(const ckpt::RunState& saved, data::TokenLoader& train, data::TokenLoader& val);

class Trainer {
 public:
  // Builds the model (initialised from the seed), the optimizer state and
  // the train/validation loaders. Fails with a clear Status on missing or
  // bad shards.
  static Expected<std::unique_ptr<Trainer>> Create(Backend& be, const JobConfig& job, DType dtype = DType::kF32);

  Expected<StepReport> Step();
  // Mean main-head loss over eval_batches batches of the validation split,
  // always the same batches.
  Expected<double> Evaluate();

  // Everything a resume needs, copied to host memory: parameters (routing
  // biases included), AdamW moments ("optimizer.exp_avg." / "optimizer.exp_avg_sq."
  // + the parameter's name), the step, both loaders' positions, the seed and
  // the config text. The tensors are views into one staging arena, the only
  // staging memory a save uses (kept for the next capture once the snapshot
  // is gone). On a GPU the copies run in the background, beside the next
  // step's forward and backward (the snapshot's WaitReady() waits for them;
  // the next optimizer step's kernels wait for them on the device).
  Expected<ckpt::Snapshot> Capture(const std::map<std::string, double>& metrics) const;
  // Allocates Capture's staging arena now (page-locking 1 GiB takes ~0.4 s
  // on a GPU host), so that a run that checkpoints pays it at start-up
  // rather than as the first save's stall.
  Status PrepareCapture() const;
  // Puts a snapshot back. Every tensor must match by name, shape and dtype
  // (an error names the first that does not), and the seed must be this
  // job's (it orders the data); on error nothing is changed.
  // Afterwards Step() continues exactly as the saved run would have.
  Status Restore(const ckpt::Snapshot& snap);

  Model& model() { return *model_; }
  int step() const { return step_; }
  const JobConfig& job() const { return job_; }
  // Unigram cross-entropy of the validation tokens under train-set
  // frequencies: the baseline a model that ignores context reaches.
  double unigram_baseline() const { return unigram_baseline_; }
  int64_t train_tokens() const { return train_tokens_; }

 private:
  Trainer(Backend& be, JobConfig job) : be_(be), job_(std::move(job)) {}
  Status Init(DType dtype);
  void OptimizerStep(double lr, double clip_scale);
  // (name, tensor) of everything Capture() saves, in a fixed order.
  std::vector<std::pair<std::string, Tensor*>> StateTensors() const;

  Backend& be_;
  JobConfig job_;
  std::unique_ptr<Model> model_;
  ModelParams adam_m_, adam_v_;
  std::unique_ptr<data::TokenLoader> train_loader_, val_loader_;
  int step_ = 0;
  mutable std::shared_ptr<uint8_t> staging_;  // Capture's arena (page-locked on a GPU)
  mutable size_t staging_bytes_ = 0;
  double unigram_baseline_ = 0;
  int64_t train_tokens_ = 0;
};

}  // namespace troupe
