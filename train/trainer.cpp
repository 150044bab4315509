#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <limits>

#include "data/shards.h"
#include "data/stats.h"
#include "gpu/model/bias_update.h"
#include "train/lr_schedule.h"

namespace troupe {
namespace {

// Staging arena slots start on 64-byte boundaries.
size_t AlignedBytes(size_t n) { return (n + 63) / 64 * 64; }

Expected<std::vector<uint16_t>> ReadAll(const std::vector<std::string>& paths, int vocab) {
  std::vector<uint16_t> all;
  for (const std::string& p : paths) {
    TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> part, data::ReadShard(p, vocab));
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

}  // namespace

std::map<std::string, double> CheckpointMetrics(const StepReport& step, std::optional<double> val_loss) {
  std::map<std::string, double> m{{"loss", step.loss.total},
                                  {"main_loss", step.loss.main},
                                  {"lr", step.lr},
                                  {"grad_norm", step.grad_norm},
                                  {"tokens_per_s", step.seconds > 0 ? step.tokens / step.seconds : 0}};
  if (val_loss) m["val_loss"] = *val_loss;
  return m;
}

Status OpenJobLoaders(const JobConfig& job, std::unique_ptr<data::TokenLoader>* train,
                      std::unique_ptr<data::TokenLoader>* val) {
  const int extra = 1 + job.model.num_nextn_predict_layers;
  const data::LoaderOptions train_opts{job.train.seq_len, extra, data::LoaderMode::kTrain, job.train.seed};
  const data::LoaderOptions val_opts{job.train.seq_len, extra, data::LoaderMode::kEval, 0};
  TROUPE_ASSIGN_OR_RETURN(data::TokenLoader t,
                          data::TokenLoader::Open(job.data.train_shards, job.model.vocab_size, train_opts));
  TROUPE_ASSIGN_OR_RETURN(data::TokenLoader v,
                          data::TokenLoader::Open(job.data.val_shards, job.model.vocab_size, val_opts));
  *train = std::make_unique<data::TokenLoader>(std::move(t));
  *val = std::make_unique<data::TokenLoader>(std::move(v));
  return Status::Ok();
}

Expected<std::unique_ptr<Trainer>> Trainer::Create(Backend& be, const JobConfig& job, DType dtype) {
  std::unique_ptr<Trainer> t(new Trainer(be, job));
  TROUPE_RETURN_IF_ERROR(t->Init(dtype));
  return t;
}

Status Trainer::Init(DType dtype) {
  const ModelConfig& mc = job_.model;
  const TrainConfig& tc = job_.train;
  TROUPE_RETURN_IF_ERROR(OpenJobLoaders(job_, &train_loader_, &val_loader_));
  train_tokens_ = train_loader_->num_tokens();
  {
    TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> train_tokens, ReadAll(job_.data.train_shards, mc.vocab_size));
    TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> val_tokens, ReadAll(job_.data.val_shards, mc.vocab_size));
    TROUPE_ASSIGN_OR_RETURN(unigram_baseline_, data::UnigramCrossEntropy(train_tokens, val_tokens, mc.vocab_size));
  }
  TROUPE_ASSIGN_OR_RETURN(model_, Model::Create(be_, mc, dtype, tc.batch_size, tc.seq_len));
  TROUPE_RETURN_IF_ERROR(InitParams(be_, mc, tc.seed, model_->params()));
  TROUPE_ASSIGN_OR_RETURN(adam_m_, AllocateParams(be_, mc, dtype));
  TROUPE_ASSIGN_OR_RETURN(adam_v_, AllocateParams(be_, mc, dtype));
  return Status::Ok();
}

void Trainer::OptimizerStep(double lr, double clip_scale) {
  // A checkpoint capture may still be copying the weights and moments out.
  be_.FenceHostCopies();
  const TrainConfig& tc = job_.train;
  std::vector<ParamRef> params = ListParams(model_->params());
  std::vector<ParamRef> grads = ListParams(model_->grads());
  std::vector<ParamRef> m = ListParams(adam_m_);
  std::vector<ParamRef> v = ListParams(adam_v_);
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    be_.AdamWStep(*params[i].tensor, *grads[i].tensor, *m[i].tensor, *v[i].tensor,
                  AdamWSettings(tc, lr, clip_scale, step_ + 1, params[i].weight_decay));
  }
}

Expected<StepReport> Trainer::Step() {
  const TrainConfig& tc = job_.train;
  const auto start = std::chrono::steady_clock::now();
  TROUPE_ASSIGN_OR_RETURN(std::vector<int32_t> batch, train_loader_->NextBatch(tc.batch_size));
  model_->ZeroGrads();
  StepReport r;
  TROUPE_ASSIGN_OR_RETURN(r.loss, model_->Forward(batch.data(), LossWeights{tc.mtp_lambda, tc.balance_alpha}));
  if (!std::isfinite(r.loss.total)) {
    return Status::Internal("training diverged: loss is " + std::to_string(r.loss.total) + " at step " +
                            std::to_string(step_ + 1) + " (try a lower train.lr)");
  }
  model_->Backward();
  double sq = 0.0;
  for (ParamRef& g : ListParams(model_->grads())) {
    if (g.trainable) sq += be_.SumSquares(*g.tensor);
  }
  r.grad_norm = std::sqrt(sq);
  const double clip_scale = (tc.grad_clip > 0 && r.grad_norm > tc.grad_clip) ? tc.grad_clip / r.grad_norm : 1.0;
  r.lr = LearningRate(tc, step_);
  OptimizerStep(r.lr, clip_scale);
  // Auxiliary-loss-free balancing: one bias step per optimizer step, from this batch's loads.
  std::vector<std::vector<int64_t>> loads = model_->ExpertLoads();
  std::vector<std::vector<float>> biases = model_->RoutingBiases();
  for (size_t l = 0; l < loads.size(); ++l) {
    UpdateRoutingBias(biases[l], loads[l], tc.bias_update_gamma);
    r.max_load_ratio = std::max(r.max_load_ratio, MaxLoadRatio(loads[l]));
  }
  model_->SetRoutingBiases(biases);
  // A GPU fault anywhere in the step surfaces here, never as a silent bad step.
  TROUPE_RETURN_IF_ERROR(be_.Synchronize().WithContext("step " + std::to_string(step_ + 1)));
  ++step_;
  r.step = step_;
  r.tokens = static_cast<int64_t>(tc.batch_size) * tc.seq_len;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

std::vector<std::pair<std::string, Tensor*>> Trainer::StateTensors() const {
  std::vector<std::pair<std::string, Tensor*>> out;
  for (const ParamRef& p : ListParams(model_->params())) out.emplace_back(p.name, p.tensor);
  auto m = ListParams(const_cast<ModelParams&>(adam_m_));
  auto v = ListParams(const_cast<ModelParams&>(adam_v_));
  for (const ParamRef& p : m) out.emplace_back("optimizer.exp_avg." + p.name, p.tensor);
  for (const ParamRef& p : v) out.emplace_back("optimizer.exp_avg_sq." + p.name, p.tensor);
  return out;
}

Status Trainer::PrepareCapture() const {
  size_t total = 0;
  for (const auto& [name, t] : StateTensors()) total += AlignedBytes(t->bytes());
  // A snapshot still holding the arena (a save in flight) keeps it: the next capture gets its own.
  if (staging_ && staging_bytes_ == total && staging_.use_count() == 1) return Status::Ok();
  staging_.reset();
  staging_ = be_.AllocStagingHost(total);
  if (!staging_)
    return Status::OutOfMemory("checkpoint capture: no host memory for " + std::to_string(total) + " bytes");
  staging_bytes_ = total;
  return Status::Ok();
}

Expected<ckpt::Snapshot> Trainer::Capture(const std::map<std::string, double>& metrics) const {
  ckpt::Snapshot snap;
  snap.step = step_;
  snap.seed = job_.train.seed;
  snap.metrics = metrics;
  snap.config_text = job_.toml_text;
  const data::LoaderState tr = train_loader_->GetState(), va = val_loader_->GetState();
  snap.loaders["train"] = {tr.epoch, tr.cursor};
  snap.loaders["val"] = {va.epoch, va.cursor};
  // One staging arena for the whole state, reused by every capture whose
  // previous snapshot is gone (page-locked on a GPU, so the copies run on
  // the copy engine while the next step computes).
  const auto state = StateTensors();
  TROUPE_RETURN_IF_ERROR(PrepareCapture());
  std::vector<std::pair<uint8_t*, const Tensor*>> copies;
  size_t at = 0;
  for (const auto& [name, t] : state) {
    ckpt::HostTensor h;
    h.name = name;
    h.dtype = DTypeName(t->dtype());
    h.shape = t->shape();
    h.view = std::span<const uint8_t>(staging_.get() + at, t->bytes());
    copies.emplace_back(staging_.get() + at, t);
    at += AlignedBytes(t->bytes());
    snap.tensors.push_back(std::move(h));
  }
  TROUPE_ASSIGN_OR_RETURN(std::shared_ptr<Backend::HostCopies> pending, be_.CopyToHostAsync(copies));
  snap.ready = [pending] { return pending->Wait(); };
  snap.keepalive = staging_;
  return snap;
}

Status Trainer::Restore(const ckpt::Snapshot& snap) {
  TROUPE_RETURN_IF_ERROR(snap.WaitReady().WithContext("checkpoint restore"));
  const auto targets = StateTensors();
  std::map<std::string, const ckpt::HostTensor*> by_name;
  for (const ckpt::HostTensor& h : snap.tensors) by_name[h.name] = &h;
  // Check everything first, so a bad checkpoint changes nothing.
  for (const auto& [name, t] : targets) {
    auto it = by_name.find(name);
    if (it == by_name.end()) return Status::InvalidArgument("checkpoint has no tensor " + name);
    const ckpt::HostTensor& h = *it->second;
    if (h.shape != t->shape() || h.dtype != DTypeName(t->dtype()) || h.data().size() != t->bytes())
      return Status::InvalidArgument("checkpoint tensor " + name + " is " + h.dtype + " with " +
                                     std::to_string(h.data().size()) + " bytes; this model wants " + t->ShapeString() +
                                     " " + DTypeName(t->dtype()));
  }
  if (by_name.size() != targets.size())
    return Status::InvalidArgument("checkpoint holds " + std::to_string(by_name.size()) + " tensors; this model has " +
                                   std::to_string(targets.size()) + " (a different architecture?)");
  TROUPE_RETURN_IF_ERROR(CheckResumable(snap, job_));
  TROUPE_RETURN_IF_ERROR(SetLoaderPositions(snap, *train_loader_, *val_loader_));
  be_.FenceHostCopies();  // a capture still copying these tensors reads them first
  for (const auto& [name, t] : targets) be_.CopyFromHost(*t, by_name[name]->data().data());
  step_ = static_cast<int>(snap.step);
  return be_.Synchronize().WithContext("checkpoint restore");
}

Status CheckResumable(const ckpt::RunState& saved, const JobConfig& job) {
  // The seed orders the training data: under another seed the run could not
  // continue as the saved one would have.
  if (saved.seed != job.train.seed)
    return Status::InvalidArgument("checkpoint was saved with train.seed = " + std::to_string(saved.seed) +
                                   ", this run has " + std::to_string(job.train.seed));
  if (saved.step < 0 || saved.step > std::numeric_limits<int>::max())
    return Status::InvalidArgument("checkpoint step " + std::to_string(saved.step) + " is out of range");
  if (!saved.loaders.count("train") || !saved.loaders.count("val"))
    return Status::InvalidArgument("checkpoint lacks a data loader position");
  return Status::Ok();
}

Status SetLoaderPositions(const ckpt::RunState& saved, data::TokenLoader& train, data::TokenLoader& val) {
  auto train_pos = saved.loaders.find("train"), val_pos = saved.loaders.find("val");
  if (train_pos == saved.loaders.end() || val_pos == saved.loaders.end())
    return Status::InvalidArgument("checkpoint lacks a data loader position");
  const data::LoaderState old_train = train.GetState(), old_val = val.GetState();
  Status s = train.SetState({train_pos->second.epoch, train_pos->second.cursor});
  if (s.ok()) s = val.SetState({val_pos->second.epoch, val_pos->second.cursor});
  if (!s.ok()) {
    (void)train.SetState(old_train);
    (void)val.SetState(old_val);
    return s.WithContext("checkpoint loader position (saved against other data shards?)");
  }
  return Status::Ok();
}

Expected<double> Trainer::Evaluate() {
  const TrainConfig& tc = job_.train;
  val_loader_->Reset();
  double sum = 0.0;
  int64_t count = 0;
  for (int i = 0; i < tc.eval_batches; ++i) {
    TROUPE_ASSIGN_OR_RETURN(std::vector<int32_t> batch, val_loader_->NextBatch(tc.batch_size));
    TROUPE_ASSIGN_OR_RETURN(BatchLoss loss, model_->Forward(batch.data(), LossWeights{tc.mtp_lambda, tc.balance_alpha},
                                                            /*with_mtp=*/false));
    sum += loss.main * loss.tokens;
    count += loss.tokens;
  }
  TROUPE_RETURN_IF_ERROR(be_.Synchronize().WithContext("evaluation"));
  return count ? sum / count : 0.0;
}

}  // namespace troupe
