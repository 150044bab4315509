#include "train/parallel/dist_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "gpu/cuda/cuda_info.h"
#include "gpu/host_io.h"
#include "gpu/model/bias_update.h"
#include "train/lr_schedule.h"
#include "train/parallel/collectives.h"
#include "train/parallel/tags.h"

namespace troupe::parallel {
namespace {

// Predicted positions of head k (0 = main) that count: both tokens present.
int64_t CountValid(const std::vector<int32_t>& tokens, int batch, int seq_len, int window, int k) {
  int64_t valid = 0;
  for (int s = 0; s < batch; ++s) {
    const int32_t* row = tokens.data() + static_cast<size_t>(s) * window;
    for (int i = 0; i < seq_len; ++i) valid += (row[k + i] >= 0 && row[k + i + 1] >= 0);
  }
  return valid;
}

constexpr const char* kExpAvg = "optimizer.exp_avg.";
constexpr const char* kExpAvgSq = "optimizer.exp_avg_sq.";

// Where a tensor this rank holds sits in the whole model's: its whole shape
// and its first row. Routed-expert tensors are rows [ep_rank * E/ep, ...) of
// their [E, ...] whole (dim 0 is the expert); everything else is whole.
struct WholePlace {
  std::vector<int64_t> shape;
  int64_t row_begin = 0;
};
WholePlace PlaceInWhole(const std::string& name, const Tensor& local, const Layout& layout, int ep_rank) {
  WholePlace p{local.shape(), 0};
  if (layout.ep > 1 && name.find(".mlp.experts.") != std::string::npos) {
    p.shape[0] *= layout.ep;
    p.row_begin = ep_rank * ckpt::RowsOf(local.shape());
  }
  return p;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::vector<uint8_t> FloatBytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(float));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Elements [begin, end) of a whole F32 tensor, read as the rows covering them.
Expected<std::vector<float>> ReadElements(const DistributedTrainer::RowReader& read, const ckpt::TensorRecord& t,
                                          int64_t begin, int64_t end) {
  const int64_t row_elems = t.row_bytes() / static_cast<int64_t>(sizeof(float));
  if (row_elems <= 0 || begin < 0 || end < begin || end > t.rows() * row_elems)
    return Status::InvalidArgument("checkpoint tensor " + t.name + ": elements [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + ") are outside it");
  const int64_t first_row = begin / row_elems, end_row = (end + row_elems - 1) / row_elems;
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read(t, first_row, end_row));
  std::vector<float> out(static_cast<size_t>(end - begin));
  std::memcpy(out.data(), bytes.data() + (begin - first_row * row_elems) * sizeof(float), out.size() * sizeof(float));
  return out;
}

}  // namespace

DistributedTrainer::DistributedTrainer(Backend& be, JobConfig job, Layout layout, ProcessGroup& group, int timeout_ms)
    : be_(be), job_(std::move(job)), layout_(std::move(layout)), group_(group), timeout_ms_(timeout_ms) {}

Expected<std::unique_ptr<DistributedTrainer>> DistributedTrainer::Create(Backend& be, const JobConfig& job,
                                                                         const Layout& layout, ProcessGroup& group,
                                                                         int timeout_ms,
                                                                         DeviceCommsMaker device_comms) {
  if (group.size() != layout.world())
    return Status::InvalidArgument("the layout has " + std::to_string(layout.world()) + " ranks; the group has " +
                                   std::to_string(group.size()));
  std::unique_ptr<DistributedTrainer> t(new DistributedTrainer(be, job, layout, group, timeout_ms));
  TROUPE_RETURN_IF_ERROR(t->Init(device_comms));
  return t;
}

std::vector<Model*> DistributedTrainer::modules() {
  std::vector<Model*> out;
  for (auto& m : modules_) out.push_back(m.get());
  return out;
}

Status DistributedTrainer::Init(const DeviceCommsMaker& device_comms) {
  const ModelConfig& mc = job_.model;
  const TrainConfig& tc = job_.train;
  rank_ = group_.rank();
  for (int r = 0; r < layout_.world(); ++r) world_.push_back(r);
  TROUPE_RETURN_IF_ERROR(CheckSameJob());
  TROUPE_RETURN_IF_ERROR(OpenJobLoaders(job_, &train_loader_, &val_loader_));
  if (layout_.pp > 1) {
    TROUPE_ASSIGN_OR_RETURN(schedule_,
                            BuildSchedule(layout_.schedule, layout_.pp, layout_.micro_batches, layout_.split_w));
  } else {
    // One stage: the micro-batches run one after another (gradient accumulation).
    schedule_.kind = ScheduleKind::k1F1B;
    schedule_.ranks = 1;
    schedule_.stages = 1;
    schedule_.micro_batches = layout_.micro_batches;
    schedule_.split_w = false;
    schedule_.per_rank.assign(1, {});
    for (int m = 0; m < layout_.micro_batches; ++m) {
      schedule_.per_rank[0].push_back(Op{OpKind::kForward, {m, 0}, {}});
      schedule_.per_rank[0].push_back(Op{OpKind::kBackward, {}, {m, 0}});
    }
  }
  const int pp_rank = layout_.CoordOf(rank_).pp_rank;
  const int held = layout_.pp > 1 ? static_cast<int>(layout_.StagesOf(pp_rank).size()) : 1;
  const std::vector<int> slots = SlotsNeeded(schedule_, pp_rank, held);
  if (layout_.ep > 1)
    expert_exchange_ = std::make_unique<GroupExpertExchange>(group_, layout_.ExpertGroupOf(rank_), timeout_ms_);
  for (int i = 0; i < held; ++i) {
    TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<Model> m, Model::Create(be_, mc, DType::kF32, layout_.micro_batch_size,
                                                                    tc.seq_len, layout_.SpanOf(rank_, i), slots[i]));
    TROUPE_RETURN_IF_ERROR(InitParams(be_, mc, tc.seed, m->params()));
    m->SetExpertExchange(expert_exchange_.get());
    modules_.push_back(std::move(m));
  }
  holders_ = layout_.ParamHolders(mc, rank_);
  // One pass over every rank's holdings gives the whole job's buckets (every
  // rank must see the same list: a bucket's index is its collectives' tag)
  // and who sends which tensor in the final weight gather (each copy-set's
  // lowest rank), both in ParamNames order.
  std::map<std::string, size_t> order;
  for (const std::string& name : ParamNames(mc, ParamSelection{})) order.emplace(name, order.size());
  std::map<std::vector<int>, std::map<size_t, std::string>> by_holders;
  gather_senders_.assign(layout_.world(), {});
  for (int r = 0; r < layout_.world(); ++r) {
    std::map<size_t, std::string> sent;
    for (auto& [name, holders] : layout_.ParamHolders(mc, r)) {
      if (IsTrainableParam(name)) by_holders[holders][order.at(name)] = name;
      if (holders.front() == r) sent[order.at(name)] = name;
    }
    for (auto& [index, name] : sent) gather_senders_[r].push_back(name);
  }
  std::vector<Bucket> buckets;
  for (auto& [holders, names] : by_holders) {
    Bucket b{holders, {}};
    for (auto& [index, name] : names) b.names.push_back(name);
    buckets.push_back(std::move(b));
  }
  std::vector<ModelParams*> params, grads;
  for (auto& m : modules_) {
    params.push_back(&m->params());
    grads.push_back(&m->grads());
  }
  if (device_comms) {
    device_comm_ = "injected";
  } else {
    const int gpus = be_.device() == DeviceKind::kCuda ? CudaDeviceCount() : 0;
    TROUPE_ASSIGN_OR_RETURN(device_comm_, ChooseDeviceComm(job_.parallel.device_comm, be_, layout_.world(), gpus));
  }
  if (device_comm_ != "host") {
    // Every rank lists every group (the join order is global): the buckets'
    // holders and the expert groups, these twice (forward and backward, which
    // an F&B pair runs at once).
    std::vector<DeviceGroup> groups;
    for (const Bucket& b : buckets) groups.push_back({b.holders});
    for (int r = 0; layout_.ep > 1 && r < layout_.world(); ++r)
      for (int copy : {0, 1}) groups.push_back({layout_.ExpertGroupOf(r), copy});
    // Stage-to-stage transfers get links of their own where the schedule
    // issues each link's transfers in one order on both ends.
    std::vector<DeviceLink> links;
    if (layout_.pp > 1) {
      Expected<std::vector<DeviceLink>> planned = PipelineLinks(layout_, schedule_);
      if (planned.ok())
        links = std::move(planned).value();
      else
        pipeline_links_note_ = "host memory over ZeroMQ (" + planned.status().message() + ")";
    }
    TROUPE_ASSIGN_OR_RETURN(device_comms_, device_comms ? device_comms(std::move(groups), std::move(links))
                                                        : DeviceComms::Connect(be_, group_, std::move(groups),
                                                                               std::move(links), timeout_ms_));
    if (device_comms_->links() > 0)
      pipeline_links_note_ = std::to_string(device_comms_->links()) + " device links on this rank";
    if (expert_exchange_) {
      std::vector<int> members = layout_.ExpertGroupOf(rank_);
      std::sort(members.begin(), members.end());
      expert_exchange_->SetDevice(device_comms_->Find(members, 0), device_comms_->Find(members, 1));
    }
  }
  TROUPE_ASSIGN_OR_RETURN(optimizer_, BucketOptimizer::Create(be_, group_, std::move(buckets), params, grads,
                                                              job_.parallel.zero1, timeout_ms_, device_comms_.get()));
  runner_ = std::make_unique<PipelineRunner>(layout_, schedule_, rank_, group_, modules(), timeout_ms_,
                                             expert_exchange_.get(), OverlapsPairs(job_.parallel, layout_),
                                             device_comms_.get());
  return Status::Ok();
}

Status DistributedTrainer::CheckSameJob() {
  // The config text, the layout and the settings the flags may change. The
  // NCCL paths check no sizes, so ranks that read different configs (a file
  // edited while they started, a rank started by hand) would hang or mix
  // garbage; every rank sends its fingerprint to every other and compares.
  const ParallelConfig& p = job_.parallel;
  const std::string job = job_.toml_text + "\n" + layout_.Explain() + "\nzero1 " + std::to_string(p.zero1) +
                          " device_comm " + p.device_comm + " overlap_pairs " + p.overlap_pairs + " seq_len " +
                          std::to_string(job_.train.seq_len) + " seed " + std::to_string(job_.train.seed);
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : job) hash = (hash ^ c) * 1099511628211ull;
  std::vector<uint8_t> mine(sizeof hash);
  std::memcpy(mine.data(), &hash, sizeof hash);
  TROUPE_ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> all,
                          AllToAllV(group_, world_, std::vector<std::vector<uint8_t>>(world_.size(), mine),
                                    Tag(TagKind::kJobCheck), timeout_ms_));
  std::string differ;
  for (int r : world_)
    if (all[r] != mine) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
  if (!differ.empty())
    return Status::InvalidArgument("rank(s) " + differ + " run another job than rank " + std::to_string(rank_) +
                                   " (config text, layout or parallel settings differ): start every rank from one "
                                   "config file and the same flags");
  return Status::Ok();
}

bool OverlapsPairs(const ParallelConfig& p, const Layout& layout) {
  return p.overlap_pairs == "on" || (p.overlap_pairs == "auto" && layout.ep > 1);
}

PipelineRunner::MicroTokens DistributedTrainer::MicroBatches(const std::vector<int32_t>& batch) const {
  const size_t window = static_cast<size_t>(job_.train.seq_len) + 1 + job_.model.num_nextn_predict_layers;
  const size_t rows = static_cast<size_t>(layout_.micro_batch_size);
  const int32_t* shard = batch.data() + layout_.ShardOf(rank_) * layout_.micro_batches * rows * window;
  return [shard, rows, window](int m) { return shard + static_cast<size_t>(m) * rows * window; };
}

Expected<double> DistributedTrainer::SumOverWorld(double v, uint64_t tag) {
  return AllReduceSumScalar(group_, world_, v, tag, timeout_ms_);
}

Status DistributedTrainer::UpdateRoutingBiases(double* max_load_ratio) {
  // Loads this rank saw, per bias tensor (summed over local copies).
  std::map<std::string, std::vector<int64_t>> local;
  std::map<std::string, std::vector<Tensor*>> biases;
  const std::vector<std::vector<std::vector<int64_t>>>& loads = runner_->loads();
  for (size_t m = 0; m < modules_.size(); ++m) {
    size_t i = 0;
    for (LayerParams& l : modules_[m]->params().layers) {
      if (!l.is_moe || !l.moe.bias.defined()) continue;
      const std::string& name = l.moe.bias.name();
      biases[name].push_back(&l.moe.bias);
      if (m < loads.size() && i < loads[m].size()) {
        auto& acc = local[name];
        if (acc.empty()) acc.assign(loads[m][i].size(), 0);
        for (size_t e = 0; e < acc.size(); ++e) acc[e] += loads[m][i][e];
      }
      ++i;
    }
  }
  uint64_t index = 0;
  for (const std::string& name : ParamNames(job_.model, ParamSelection{})) {
    if (IsTrainableParam(name)) continue;
    ++index;
    auto it = biases.find(name);
    if (it == biases.end()) continue;
    std::vector<int64_t>& mine = local[name];
    mine.resize(static_cast<size_t>(job_.model.n_routed_experts), 0);
    // Exact over float all-reduces: each count travels as (x >> 12, x & 4095);
    // both halves stay below 2^24 for counts below 2^36 summed over < 4096 ranks.
    std::vector<float> sum(2 * mine.size());
    for (size_t e = 0; e < mine.size(); ++e) {
      sum[e] = static_cast<float>(mine[e] >> 12);
      sum[mine.size() + e] = static_cast<float>(mine[e] & 4095);
    }
    const std::vector<int>& holders = holders_.at(name);
    if (holders.size() > 1)
      TROUPE_RETURN_IF_ERROR(AllReduceSum(group_, holders, sum, Tag(TagKind::kLoads, index), timeout_ms_)
                                 .WithContext("expert load all-reduce"));
    std::vector<int64_t> total(mine.size());
    for (size_t e = 0; e < mine.size(); ++e)
      total[e] = (static_cast<int64_t>(sum[e]) << 12) + static_cast<int64_t>(sum[mine.size() + e]);
    *max_load_ratio = std::max(*max_load_ratio, MaxLoadRatio(total));
    std::vector<float> b = ToHostFloats(be_, *it->second.front());
    UpdateRoutingBias(b, total, job_.train.bias_update_gamma);
    for (Tensor* t : it->second) FromHostFloats(be_, *t, b);
  }
  return Status::Ok();
}

Status DistributedTrainer::GatherWeights(ModelParams* whole) {
  std::map<std::string, Tensor*> mine;
  for (auto& m : modules_)
    for (ParamRef& r : ListParams(m->params())) mine.emplace(r.name, r.tensor);
  for (const std::string& name : gather_senders_[rank_]) {
    const Tensor& t = *mine.at(name);
    std::vector<uint8_t> bytes(t.bytes());
    be_.CopyToHost(bytes.data(), t);
    TROUPE_RETURN_IF_ERROR(group_.Send(0, Tag(TagKind::kGather), std::move(bytes)).WithContext("weight gather"));
  }
  // Everyone waits until rank 0 has it all: a rank that exited at once could
  // lose frames still queued in its sockets.
  auto done = [&] {
    return Barrier(group_, world_, Tag(TagKind::kBarrier, 1), timeout_ms_).WithContext("weight gather");
  };
  if (whole == nullptr) return done();
  std::map<std::string, Tensor*> into;
  for (ParamRef& r : ListParams(*whole)) into.emplace(r.name, r.tensor);
  for (int r = 0; r < layout_.world(); ++r) {
    const int ep_rank = layout_.CoordOf(r).ep_rank;
    for (const std::string& name : gather_senders_[r]) {
      auto it = into.find(name);
      if (it == into.end()) return Status::Internal("weight gather: no tensor " + name + " in the whole model");
      TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, group_.Recv(r, Tag(TagKind::kGather), timeout_ms_));
      Tensor dst = *it->second;
      const bool shard = name.find(".mlp.experts.") != std::string::npos && layout_.ep > 1;
      if (shard) {
        const int64_t rows = dst.dim(0) / layout_.ep;
        dst = dst.SliceRows(0, dst.dim(0)).Reshape({dst.dim(0), dst.numel() / dst.dim(0)});
        dst = dst.SliceRows(ep_rank * rows, (ep_rank + 1) * rows);
      }
      if (bytes.size() != dst.bytes())
        return Status::Corruption("weight gather: " + name + " from rank " + std::to_string(r) + " has " +
                                  std::to_string(bytes.size()) + " bytes; expected " + std::to_string(dst.bytes()));
      be_.CopyFromHost(dst, bytes.data());
    }
  }
  TROUPE_RETURN_IF_ERROR(be_.Synchronize().WithContext("weight gather"));
  return done();
}

std::vector<std::string> DistributedTrainer::CheckpointTensorNames(const ModelConfig& mc) {
  const std::vector<std::string> params = ParamNames(mc, ParamSelection{});
  std::vector<std::string> out = params;
  for (const std::string& n : params) out.push_back(kExpAvg + n);
  for (const std::string& n : params) out.push_back(kExpAvgSq + n);
  return out;
}

ckpt::RunState DistributedTrainer::CaptureRunState(const std::map<std::string, double>& metrics) const {
  ckpt::RunState st;
  st.step = step_;
  st.seed = job_.train.seed;
  st.metrics = metrics;
  st.config_text = job_.toml_text;
  st.layout = {layout_.pp, layout_.ep, layout_.dp};
  const data::LoaderState tr = train_loader_->GetState(), va = val_loader_->GetState();
  st.loaders["train"] = {tr.epoch, tr.cursor};
  st.loaders["val"] = {va.epoch, va.cursor};
  return st;
}

Expected<std::vector<ckpt::HostPiece>> DistributedTrainer::CapturePieces() {
  // The moments first: the gather is the collective part, and every rank
  // must enter it whatever it holds.
  TROUPE_ASSIGN_OR_RETURN(std::vector<BucketOptimizer::TensorState> states, optimizer_->GatherStateToLeads());
  std::map<std::string, BucketOptimizer::TensorState*> state_of;
  for (auto& st : states) state_of[st.name] = &st;
  std::map<std::string, Tensor*> mine;
  for (auto& m : modules_)
    for (ParamRef& r : ListParams(m->params())) mine.emplace(r.name, r.tensor);
  const int ep_rank = layout_.CoordOf(rank_).ep_rank;
  std::vector<ckpt::HostPiece> params, moments;
  for (const std::string& name : gather_senders_[rank_]) {
    const Tensor& t = *mine.at(name);
    const WholePlace at = PlaceInWhole(name, t, layout_, ep_rank);
    const int64_t rows = ckpt::RowsOf(t.shape());
    ckpt::HostPiece p{name, DTypeName(t.dtype()), at.shape, at.row_begin, at.row_begin + rows, {}};
    p.bytes = ckpt::StagingPool::Shared().Take(t.bytes());
    be_.CopyToHost(p.bytes.data(), t);
    params.push_back(std::move(p));
    // The routing biases take no AdamW step: their moments stay zero, saved
    // as Trainer::Capture saves them.
    auto st = state_of.find(name);
    std::vector<float> zeros;
    if (st == state_of.end()) {
      if (IsTrainableParam(name))
        return Status::Internal("checkpoint capture: rank " + std::to_string(rank_) + " lacks the moments of " + name);
      zeros.assign(static_cast<size_t>(t.numel()), 0.0f);
    }
    for (int k = 0; k < 2; ++k) {
      const std::vector<float>& v = st == state_of.end() ? zeros
                                    : k == 0             ? st->second->exp_avg
                                                         : st->second->exp_avg_sq;
      if (static_cast<int64_t>(v.size()) != t.numel())
        return Status::Internal("checkpoint capture: the moments of " + name + " have " + std::to_string(v.size()) +
                                " elements; the tensor has " + std::to_string(t.numel()));
      moments.push_back({std::string(k == 0 ? kExpAvg : kExpAvgSq) + name, "F32", at.shape, at.row_begin,
                         at.row_begin + rows, FloatBytes(v)});
    }
  }
  TROUPE_RETURN_IF_ERROR(be_.Synchronize().WithContext("checkpoint capture"));
  for (ckpt::HostPiece& p : moments) params.push_back(std::move(p));
  return params;
}

Status DistributedTrainer::Restore(const ckpt::Manifest& m, const RowReader& read) {
  // The same architecture: exactly the tensors a checkpoint of this model has.
  const std::vector<std::string> names = CheckpointTensorNames(job_.model);
  if (m.tensors.size() != names.size())
    return Status::InvalidArgument("checkpoint " + m.id + " holds " + std::to_string(m.tensors.size()) +
                                   " tensors; this model's checkpoints hold " + std::to_string(names.size()) +
                                   " (a different architecture?)");
  for (const std::string& n : names)
    if (m.Find(n) == nullptr) return Status::InvalidArgument("checkpoint " + m.id + " has no tensor " + n);
  TROUPE_RETURN_IF_ERROR(CheckResumable(m, job_));

  // Every held tensor: its whole shape and dtype must be the checkpoint's.
  const int ep_rank = layout_.CoordOf(rank_).ep_rank;
  std::map<std::string, std::vector<Tensor*>> copies;
  for (auto& mod : modules_)
    for (ParamRef& r : ListParams(mod->params())) copies[r.name].push_back(r.tensor);
  std::map<std::string, WholePlace> placed;
  for (auto& [name, ts] : copies) {
    const Tensor& t = *ts.front();
    const WholePlace at = PlaceInWhole(name, t, layout_, ep_rank);
    for (const std::string& full : {name, kExpAvg + name, kExpAvgSq + name}) {
      const ckpt::TensorRecord& rec = *m.Find(full);
      if (rec.shape != at.shape || rec.dtype != "F32" || rec.row_bytes() != t.numel() / ckpt::RowsOf(t.shape()) * 4)
        return Status::InvalidArgument("checkpoint tensor " + full + " is " + rec.dtype + " " + ShapeText(rec.shape) +
                                       "; this model wants F32 " + ShapeText(at.shape));
    }
    placed[name] = at;
  }
  // Read everything first: a failed read changes nothing.
  std::map<std::string, std::vector<uint8_t>> values;
  for (auto& [name, ts] : copies) {
    const WholePlace& at = placed[name];
    TROUPE_ASSIGN_OR_RETURN(values[name],
                            read(*m.Find(name), at.row_begin, at.row_begin + ckpt::RowsOf(ts.front()->shape())));
  }
  // The moments of this rank's optimizer chunks, as element ranges of the
  // tensors it holds, i.e. of their rows in the whole tensor.
  auto read_state = [&](const std::string& name, int64_t begin,
                        int64_t end) -> Expected<std::pair<std::vector<float>, std::vector<float>>> {
    auto it = placed.find(name);
    if (it == placed.end()) return Status::Internal("checkpoint restore: no tensor " + name + " on this rank");
    const Tensor& t = *copies.at(name).front();
    const int64_t offset = it->second.row_begin * (t.numel() / ckpt::RowsOf(t.shape()));
    TROUPE_ASSIGN_OR_RETURN(std::vector<float> mv,
                            ReadElements(read, *m.Find(kExpAvg + name), offset + begin, offset + end));
    TROUPE_ASSIGN_OR_RETURN(std::vector<float> vv,
                            ReadElements(read, *m.Find(kExpAvgSq + name), offset + begin, offset + end));
    return std::make_pair(std::move(mv), std::move(vv));
  };
  const data::LoaderState old_train = train_loader_->GetState(), old_val = val_loader_->GetState();
  TROUPE_RETURN_IF_ERROR(SetLoaderPositions(m, *train_loader_, *val_loader_).WithContext("checkpoint " + m.id));
  Status s = optimizer_->LoadState(read_state);  // reads it all, then sets it
  if (!s.ok()) {
    (void)train_loader_->SetState(old_train);
    (void)val_loader_->SetState(old_val);
    return s.WithContext("checkpoint " + m.id);
  }
  for (auto& [name, ts] : copies)
    for (Tensor* t : ts) be_.CopyFromHost(*t, values[name].data());
  step_ = static_cast<int>(m.step);
  return be_.Synchronize().WithContext("checkpoint restore");
}

Status DistributedTrainer::EnableKernelTimeline() {
  TROUPE_RETURN_IF_ERROR(be_.StartKernelTimeline());
  kernel_timeline_ = true;
  return Status::Ok();
}

Expected<StepReport> DistributedTrainer::Step() {
  const TrainConfig& tc = job_.train;
  const ModelConfig& mc = job_.model;
  const auto start = std::chrono::steady_clock::now();
  const int window = tc.seq_len + 1 + mc.num_nextn_predict_layers, depth = mc.num_nextn_predict_layers;
  TROUPE_ASSIGN_OR_RETURN(std::vector<int32_t> batch, train_loader_->NextBatch(layout_.global_batch));
  for (auto& m : modules_) m->ZeroGrads();
  // The whole global batch normalises the loss, whatever shard a rank runs.
  StageLoss global;
  global.main_valid = CountValid(batch, layout_.global_batch, tc.seq_len, window, 0);
  for (int k = 1; k <= depth; ++k)
    global.mtp_valid.push_back(CountValid(batch, layout_.global_batch, tc.seq_len, window, k));
  const LossScale scale = LossScaleOf(global, layout_.global_batch, tc.mtp_lambda);
  const PipelineRunner::MicroTokens micro = MicroBatches(batch);

  if (expert_exchange_) expert_exchange_->stats() = ExpertRouteStats{};  // this step's routing only
  TROUPE_RETURN_IF_ERROR(Barrier(group_, world_, Tag(TagKind::kBarrier), timeout_ms_).WithContext("step start"));
  if (kernel_timeline_) TROUPE_RETURN_IF_ERROR(be_.TakeKernelSpans().status());  // the previous step's tail: not ours
  const double wait_before = group_.stats().recv_wait_s;
  TROUPE_RETURN_IF_ERROR(runner_->RunTrainStep(micro, LossWeights{tc.mtp_lambda, tc.balance_alpha}, scale)
                             .WithContext("step " + std::to_string(step_ + 1)));
  KernelOverlap kernels;
  if (kernel_timeline_) {
    TROUPE_ASSIGN_OR_RETURN(std::vector<KernelSpan> spans, be_.TakeKernelSpans());
    kernels = OverlapOf(std::move(spans));
  }
  timing_ = StepTiming{};
  double waited = 0, hidden = 0;
  for (const OpRecord& r : runner_->timeline()) {
    timing_.busy_s += r.end - r.start - r.wait;
    waited += r.waited;
    hidden += r.hidden;
  }
  timing_.recv_wait_s = group_.stats().recv_wait_s - wait_before;
  const auto sync_start = std::chrono::steady_clock::now();
  const double mine = runner_->timeline().empty() ? 0.0 : runner_->timeline().back().end;
  TROUPE_ASSIGN_OR_RETURN(timing_.pipeline_s,
                          AllReduceMaxScalar(group_, world_, mine, Tag(TagKind::kWorld, 2), timeout_ms_));
  TROUPE_ASSIGN_OR_RETURN(double busy, SumOverWorld(timing_.busy_s, Tag(TagKind::kWorld, 7)));
  timing_.bubble_share = timing_.pipeline_s > 0 ? 1.0 - busy / (layout_.world() * timing_.pipeline_s) : 0.0;
  TROUPE_ASSIGN_OR_RETURN(timing_.comm_waited_s, SumOverWorld(waited, Tag(TagKind::kWorld, 12)));
  TROUPE_ASSIGN_OR_RETURN(timing_.comm_hidden_s, SumOverWorld(hidden, Tag(TagKind::kWorld, 12)));
  if (kernel_timeline_) {
    TROUPE_ASSIGN_OR_RETURN(timing_.kernel_comm_s, SumOverWorld(kernels.comm_s, Tag(TagKind::kWorld, 13)));
    TROUPE_ASSIGN_OR_RETURN(timing_.kernel_compute_s, SumOverWorld(kernels.compute_s, Tag(TagKind::kWorld, 13)));
    TROUPE_ASSIGN_OR_RETURN(timing_.kernel_hidden_s, SumOverWorld(kernels.hidden_s, Tag(TagKind::kWorld, 13)));
  }
  {
    double sums[4] = {0, 0, 0, 0}, counts[4] = {0, 0, 0, 0};
    for (const OpRecord& op : runner_->timeline()) {
      const int k = op.kind == OpKind::kForward    ? 0
                    : op.kind == OpKind::kBackward ? 1
                    : op.kind == OpKind::kWeight   ? 3
                                                   : 2;
      sums[k] += op.end - op.start - op.wait;
      counts[k] += 1;
    }
    double* means[4] = {&timing_.mean_f_s, &timing_.mean_b_s, &timing_.mean_fb_s, &timing_.mean_w_s};
    for (int k = 0; k < 4; ++k) {
      TROUPE_ASSIGN_OR_RETURN(double s, SumOverWorld(sums[k], Tag(TagKind::kWorld, 8)));
      TROUPE_ASSIGN_OR_RETURN(double n, SumOverWorld(counts[k], Tag(TagKind::kWorld, 8)));
      *means[k] = n > 0 ? s / n : 0.0;
    }
  }

  if (expert_exchange_) {
    ExpertRouteStats& st = expert_exchange_->stats();
    TROUPE_ASSIGN_OR_RETURN(double copies, SumOverWorld(static_cast<double>(st.copies), Tag(TagKind::kWorld, 10)));
    TROUPE_ASSIGN_OR_RETURN(double remote,
                            SumOverWorld(static_cast<double>(st.remote_copies), Tag(TagKind::kWorld, 10)));
    TROUPE_ASSIGN_OR_RETURN(
        double most, AllReduceMaxScalar(group_, world_, st.max_ranks_per_token, Tag(TagKind::kWorld, 11), timeout_ms_));
    timing_.ep_remote_share = copies > 0 ? remote / copies : 0.0;
    timing_.ep_max_ranks_per_token = static_cast<int>(most);
    st = ExpertRouteStats{};
  }
  StepReport r;
  const StageLoss& l = runner_->loss();
  TROUPE_ASSIGN_OR_RETURN(global.main_sum, SumOverWorld(l.main_sum, Tag(TagKind::kWorld, 3)));
  TROUPE_ASSIGN_OR_RETURN(global.balance_sum, SumOverWorld(l.balance_sum, Tag(TagKind::kWorld, 4)));
  for (int k = 0; k < depth; ++k) {
    const double part = k < static_cast<int>(l.mtp_sum.size()) ? l.mtp_sum[k] : 0.0;
    TROUPE_ASSIGN_OR_RETURN(double sum, SumOverWorld(part, Tag(TagKind::kWorld, 5)));
    global.mtp_sum.push_back(sum);
  }
  r.loss = BatchLossOf(global, layout_.global_batch, tc.mtp_lambda);
  if (!std::isfinite(r.loss.total))
    return Status::Internal("training diverged: loss is " + std::to_string(r.loss.total) + " at step " +
                            std::to_string(step_ + 1) + " (try a lower train.lr)");
  TROUPE_RETURN_IF_ERROR(optimizer_->ReduceGradients());
  TROUPE_ASSIGN_OR_RETURN(double sq, SumOverWorld(optimizer_->OwnedSquaredNorm(), Tag(TagKind::kWorld, 1)));
  r.grad_norm = std::sqrt(sq);
  const double clip_scale = (tc.grad_clip > 0 && r.grad_norm > tc.grad_clip) ? tc.grad_clip / r.grad_norm : 1.0;
  r.lr = LearningRate(tc, step_);
  TROUPE_RETURN_IF_ERROR(optimizer_->Step(tc, r.lr, clip_scale, step_ + 1));
  TROUPE_RETURN_IF_ERROR(UpdateRoutingBiases(&r.max_load_ratio));
  // Only ranks holding MoE layers saw loads: the report takes the largest.
  TROUPE_ASSIGN_OR_RETURN(r.max_load_ratio,
                          AllReduceMaxScalar(group_, world_, r.max_load_ratio, Tag(TagKind::kWorld, 9), timeout_ms_));
  TROUPE_RETURN_IF_ERROR(be_.Synchronize().WithContext("step " + std::to_string(step_ + 1)));
  timing_.sync_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start).count();
  ++step_;
  r.step = step_;
  r.tokens = static_cast<int64_t>(layout_.global_batch) * tc.seq_len;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

Expected<double> DistributedTrainer::Evaluate() {
  const TrainConfig& tc = job_.train;
  const int window = tc.seq_len + 1 + job_.model.num_nextn_predict_layers;
  val_loader_->Reset();
  double sum = 0.0;
  int64_t count = 0;
  for (int i = 0; i < tc.eval_batches; ++i) {
    TROUPE_ASSIGN_OR_RETURN(std::vector<int32_t> batch, val_loader_->NextBatch(layout_.global_batch));
    count += CountValid(batch, layout_.global_batch, tc.seq_len, window, 0);
    TROUPE_RETURN_IF_ERROR(runner_->RunForwardOnly(MicroBatches(batch), LossWeights{tc.mtp_lambda, tc.balance_alpha})
                               .WithContext("evaluation"));
    TROUPE_ASSIGN_OR_RETURN(double s, SumOverWorld(runner_->loss().main_sum, Tag(TagKind::kWorld, 6)));
    sum += s;
  }
  TROUPE_RETURN_IF_ERROR(be_.Synchronize().WithContext("evaluation"));
  return count ? sum / count : 0.0;
}

}  // namespace troupe::parallel
