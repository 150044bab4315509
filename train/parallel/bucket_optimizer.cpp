#include "train/parallel/bucket_optimizer.h"

#include <algorithm>
#include <cstring>

#include "gpu/host_io.h"
#include "train/lr_schedule.h"
#include "train/parallel/collectives.h"
#include "train/parallel/tags.h"

namespace troupe::parallel {
namespace {

// Elements [begin, end) of a tensor, as a [end - begin, 1] view.
Tensor Elements(const Tensor& t, int64_t begin, int64_t end) { return t.Reshape({t.numel(), 1}).SliceRows(begin, end); }

// The bucket's tensors as one host vector (local duplicates summed).
std::vector<float> Flatten(Backend& be, const std::vector<std::vector<Tensor*>>& copies, int64_t length) {
  std::vector<float> flat(static_cast<size_t>(length));
  size_t at = 0;
  for (const auto& c : copies) {
    std::vector<float> sum = ToHostFloats(be, *c[0]);
    for (size_t i = 1; i < c.size(); ++i) {
      std::vector<float> more = ToHostFloats(be, *c[i]);
      for (size_t j = 0; j < sum.size(); ++j) sum[j] += more[j];
    }
    std::copy(sum.begin(), sum.end(), flat.begin() + at);
    at += sum.size();
  }
  return flat;
}

// Calls write(part, lo, hi) for the part of every local copy that holds
// flat elements [lo, hi), inside [begin, end).
template <typename Write>
void ForEachCopyPart(const std::vector<std::vector<Tensor*>>& copies, int64_t begin, int64_t end, Write&& write) {
  int64_t at = 0;
  for (const auto& c : copies) {
    const int64_t n = c[0]->numel();
    const int64_t lo = std::max(begin, at), hi = std::min(end, at + n);
    for (Tensor* t : c) {
      if (lo >= hi) break;
      Tensor part = Elements(*t, lo - at, hi - at);
      write(part, lo, hi);
    }
    at += n;
  }
}

// Writes flat elements [begin, end) back into every local copy.
void Scatter(Backend& be, const std::vector<std::vector<Tensor*>>& copies, const std::vector<float>& flat,
             int64_t begin, int64_t end) {
  ForEachCopyPart(copies, begin, end,
                  [&](Tensor& part, int64_t lo, int64_t) { be.CopyFromHost(part, flat.data() + lo); });
}

// Device path: the bucket's tensors packed into `flat` (local duplicates
// summed), on the backend's stream.
void Pack(Backend& be, const std::vector<std::vector<Tensor*>>& copies, Tensor& flat) {
  int64_t at = 0;
  for (const auto& c : copies) {
    const int64_t n = c[0]->numel();
    Tensor dst = Elements(flat, at, at + n);
    be.Copy(dst, c[0]->Reshape({n, 1}));
    for (size_t i = 1; i < c.size(); ++i) be.Axpy(dst, 1.0, c[i]->Reshape({n, 1}));
    at += n;
  }
}

// Writes flat elements [begin, end) back into every local copy, on the device.
void Unpack(Backend& be, const std::vector<std::vector<Tensor*>>& copies, const Tensor& flat, int64_t begin,
            int64_t end) {
  ForEachCopyPart(copies, begin, end,
                  [&](Tensor& part, int64_t lo, int64_t hi) { be.Copy(part, Elements(flat, lo, hi)); });
}

// Whether some tensor is held twice here (its copies are refreshed after AdamW).
bool HasDuplicates(const std::vector<std::vector<Tensor*>>& copies) {
  return std::any_of(copies.begin(), copies.end(), [](const auto& c) { return c.size() > 1; });
}

// The first copy of each tensor: the one AdamW updates.
std::vector<std::vector<Tensor*>> FirstCopies(const std::vector<std::vector<Tensor*>>& copies) {
  std::vector<std::vector<Tensor*>> firsts;
  for (const auto& c : copies) firsts.push_back({c[0]});
  return firsts;
}

std::vector<Tensor*> Copies(const std::vector<ModelParams*>& sets, const std::string& name, bool* weight_decay) {
  std::vector<Tensor*> out;
  for (ModelParams* p : sets) {
    for (ParamRef& r : ListParams(*p)) {
      if (r.name != name) continue;
      out.push_back(r.tensor);
      if (weight_decay) *weight_decay = r.weight_decay;
    }
  }
  return out;
}

}  // namespace

Expected<std::unique_ptr<BucketOptimizer>> BucketOptimizer::Create(Backend& be, ProcessGroup& group,
                                                                   std::vector<Bucket> buckets,
                                                                   std::vector<ModelParams*> params,
                                                                   std::vector<ModelParams*> grads, bool zero1,
                                                                   int timeout_ms, DeviceComms* device) {
  std::unique_ptr<BucketOptimizer> o(new BucketOptimizer(be, group, std::move(buckets), zero1, timeout_ms, device));
  TROUPE_RETURN_IF_ERROR(o->Init(std::move(params), std::move(grads)));
  return o;
}

Status BucketOptimizer::Init(std::vector<ModelParams*> params, std::vector<ModelParams*> grads) {
  const int rank = group_.rank();
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Bucket& bucket = buckets_[b];
    auto me = std::find(bucket.holders.begin(), bucket.holders.end(), rank);
    if (me == bucket.holders.end()) continue;
    Local l;
    l.index = b;
    l.bucket = &bucket;
    std::vector<bool> decay;
    for (const std::string& n : bucket.names) {
      bool wd = false;
      l.params.push_back(Copies(params, n, &wd));
      l.grads.push_back(Copies(grads, n, nullptr));
      if (l.params.back().empty() || l.grads.back().size() != l.params.back().size())
        return Status::Internal("rank " + std::to_string(rank) + " is listed as a holder of " + n + " but lacks it");
      decay.push_back(wd);
      l.length += l.params.back()[0]->numel();
    }
    if (zero1_) {
      const Chunk c = ChunkOf(static_cast<size_t>(l.length), bucket.holders.size(),
                              static_cast<size_t>(me - bucket.holders.begin()));
      l.chunk_begin = static_cast<int64_t>(c.offset);
      l.chunk_end = static_cast<int64_t>(c.offset + c.count);
    } else {
      l.chunk_end = l.length;
    }
    int64_t at = 0;
    for (size_t i = 0; i < bucket.names.size(); ++i) {
      const int64_t n = l.params[i][0]->numel();
      const int64_t lo = std::max(l.chunk_begin, at), hi = std::min(l.chunk_end, at + n);
      if (lo < hi)
        l.pieces.push_back({bucket.names[i], l.params[i], l.grads[i], lo - at, hi - at, lo - l.chunk_begin, decay[i]});
      at += n;
    }
    const int64_t chunk = l.chunk_end - l.chunk_begin;
    if (chunk > 0) {
      TROUPE_ASSIGN_OR_RETURN(l.m, be_.Alloc({chunk, 1}, DType::kF32, "optimizer.exp_avg"));
      TROUPE_ASSIGN_OR_RETURN(l.v, be_.Alloc({chunk, 1}, DType::kF32, "optimizer.exp_avg_sq"));
      be_.Zero(l.m);
      be_.Zero(l.v);
      state_bytes_ += 2 * static_cast<size_t>(chunk) * sizeof(float);
    }
    if (device_ != nullptr) {
      l.comm = device_->Find(bucket.holders);
      if (l.comm == nullptr && bucket.holders.size() > 1)
        return Status::Internal("no NCCL communicator for the holders of bucket " + std::to_string(b));
      TROUPE_ASSIGN_OR_RETURN(l.flat, be_.Alloc({l.length, 1}, DType::kF32, "optimizer.bucket"));
      for (size_t i = 0; i <= bucket.holders.size(); ++i)
        l.bounds.push_back(
            i == bucket.holders.size()
                ? l.length
                : static_cast<int64_t>(ChunkOf(static_cast<size_t>(l.length), bucket.holders.size(), i).offset));
    }
    mine_.push_back(std::move(l));
  }
  return Status::Ok();
}

Status BucketOptimizer::ReduceGradients() {
  if (device_ != nullptr) return ReduceGradientsOnDevice();
  for (Local& l : mine_) {
    std::vector<float> flat = Flatten(be_, l.grads, l.length);
    const std::vector<int>& holders = l.bucket->holders;
    if (holders.size() > 1) {
      Status s = zero1_ ? ReduceScatterSum(group_, holders, flat, Tag(TagKind::kGradBucket, l.index), timeout_ms_)
                        : AllReduceSum(group_, holders, flat, Tag(TagKind::kGradBucket, l.index), timeout_ms_);
      TROUPE_RETURN_IF_ERROR(s.WithContext("gradient reduction"));
    }
    Scatter(be_, l.grads, flat, l.chunk_begin, l.chunk_end);
  }
  return Status::Ok();
}

Status BucketOptimizer::ReduceGradientsOnDevice() {
  for (Local& l : mine_) Pack(be_, l.grads, l.flat);
  for (Local& l : mine_) {
    if (l.comm == nullptr) continue;
    Status s = zero1_ ? l.comm->ReduceScatterSum(l.flat, l.bounds) : l.comm->AllReduceSum(l.flat);
    if (!s.ok()) {
      device_->AbortAll(s.message());  // the reductions queued before it must not be left waiting
      return s.WithContext("gradient reduction of bucket " + std::to_string(l.index));
    }
  }
  for (Local& l : mine_) Unpack(be_, l.grads, l.flat, l.chunk_begin, l.chunk_end);
  // Here, not in the next kernel's sync: a dead holder must surface as an error within the timeout.
  return device_->WaitAll(timeout_ms_).WithContext("gradient reduction");
}

Status BucketOptimizer::GatherWeightsOnDevice() {
  bool queued = false;
  for (Local& l : mine_) {
    const bool gather = zero1_ && l.bucket->holders.size() > 1;
    if (!gather && !HasDuplicates(l.params)) continue;
    Pack(be_, FirstCopies(l.params), l.flat);
    if (gather) {
      Status s = l.comm->AllGather(l.flat, l.bounds);
      if (!s.ok()) {
        device_->AbortAll(s.message());
        return s.WithContext("weight all-gather of bucket " + std::to_string(l.index));
      }
      queued = true;
    }
    Unpack(be_, l.params, l.flat, 0, l.length);
  }
  return queued ? device_->WaitAll(timeout_ms_).WithContext("weight all-gather") : Status::Ok();
}

double BucketOptimizer::OwnedSquaredNorm() {
  double sq = 0.0;
  for (const Local& l : mine_) {
    // Plain mode: every holder has the whole sum; the first holder counts it.
    if (!zero1_ && l.bucket->holders.front() != group_.rank()) continue;
    for (const Piece& p : l.pieces) sq += be_.SumSquares(Elements(*p.grads[0], p.begin, p.end));
  }
  return sq;
}

Status BucketOptimizer::Step(const TrainConfig& tc, double lr, double clip_scale, int step) {
  for (Local& l : mine_) {
    for (const Piece& p : l.pieces) {
      const AdamWParams a = AdamWSettings(tc, lr, clip_scale, step, p.weight_decay);
      Tensor param = Elements(*p.params[0], p.begin, p.end);
      Tensor grad = Elements(*p.grads[0], p.begin, p.end);
      Tensor m = l.m.SliceRows(p.state_offset, p.state_offset + (p.end - p.begin));
      Tensor v = l.v.SliceRows(p.state_offset, p.state_offset + (p.end - p.begin));
      be_.AdamWStep(param, grad, m, v, a);
    }
    if (device_ != nullptr) continue;
    const bool gather = zero1_ && l.bucket->holders.size() > 1;
    if (!gather && !HasDuplicates(l.params)) continue;
    std::vector<float> flat = Flatten(be_, FirstCopies(l.params), l.length);
    if (gather)
      TROUPE_RETURN_IF_ERROR(AllGather(group_, l.bucket->holders, flat, Tag(TagKind::kWeights, l.index), timeout_ms_)
                                 .WithContext("weight all-gather"));
    Scatter(be_, l.params, flat, 0, l.length);
  }
  return device_ != nullptr ? GatherWeightsOnDevice() : Status::Ok();
}

Expected<std::vector<BucketOptimizer::TensorState>> BucketOptimizer::GatherStateToLeads() {
  std::vector<TensorState> out;
  for (Local& l : mine_) {
    const std::vector<int>& holders = l.bucket->holders;
    const bool lead = holders.front() == group_.rank();
    const int64_t chunk = l.chunk_end - l.chunk_begin;
    std::vector<float> m = chunk > 0 ? ToHostFloats(be_, l.m) : std::vector<float>();
    std::vector<float> v = chunk > 0 ? ToHostFloats(be_, l.v) : std::vector<float>();
    const uint64_t tag = Tag(TagKind::kOptState, l.index);
    if (!lead) {
      if (!zero1_) continue;  // the lead has the whole state already
      std::vector<uint8_t> bytes((m.size() + v.size()) * sizeof(float));
      std::memcpy(bytes.data(), m.data(), m.size() * sizeof(float));
      std::memcpy(bytes.data() + m.size() * sizeof(float), v.data(), v.size() * sizeof(float));
      TROUPE_RETURN_IF_ERROR(group_.Send(holders.front(), tag, std::move(bytes)).WithContext("optimizer state gather"));
      continue;
    }
    std::vector<float> flat_m(static_cast<size_t>(l.length)), flat_v(static_cast<size_t>(l.length));
    std::copy(m.begin(), m.end(), flat_m.begin() + l.chunk_begin);
    std::copy(v.begin(), v.end(), flat_v.begin() + l.chunk_begin);
    for (size_t i = 1; zero1_ && i < holders.size(); ++i) {
      const Chunk c = ChunkOf(static_cast<size_t>(l.length), holders.size(), i);
      TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, group_.Recv(holders[i], tag, timeout_ms_));
      if (bytes.size() != 2 * c.count * sizeof(float))
        return Status::Corruption("optimizer state gather: rank " + std::to_string(holders[i]) + " sent " +
                                  std::to_string(bytes.size()) + " bytes for bucket " + std::to_string(l.index) +
                                  "; expected " + std::to_string(2 * c.count * sizeof(float)));
      std::memcpy(flat_m.data() + c.offset, bytes.data(), c.count * sizeof(float));
      std::memcpy(flat_v.data() + c.offset, bytes.data() + c.count * sizeof(float), c.count * sizeof(float));
    }
    int64_t at = 0;
    for (size_t i = 0; i < l.bucket->names.size(); ++i) {
      const int64_t n = l.params[i][0]->numel();
      out.push_back({l.bucket->names[i], std::vector<float>(flat_m.begin() + at, flat_m.begin() + at + n),
                     std::vector<float>(flat_v.begin() + at, flat_v.begin() + at + n)});
      at += n;
    }
  }
  return out;
}

Status BucketOptimizer::LoadState(const StateReader& read) {
  std::vector<std::pair<std::vector<float>, std::vector<float>>> chunks;  // [mine_] host m and v
  for (const Local& l : mine_) {
    const int64_t chunk = l.chunk_end - l.chunk_begin;
    std::vector<float> m(static_cast<size_t>(chunk)), v(static_cast<size_t>(chunk));
    for (const Piece& p : l.pieces) {
      TROUPE_ASSIGN_OR_RETURN(auto mv, read(p.name, p.begin, p.end));
      const size_t n = static_cast<size_t>(p.end - p.begin);
      if (mv.first.size() != n || mv.second.size() != n)
        return Status::Internal("optimizer state of " + p.name + ": read " + std::to_string(mv.first.size()) +
                                " elements; expected " + std::to_string(n));
      std::copy(mv.first.begin(), mv.first.end(), m.begin() + p.state_offset);
      std::copy(mv.second.begin(), mv.second.end(), v.begin() + p.state_offset);
    }
    chunks.emplace_back(std::move(m), std::move(v));
  }
  for (size_t i = 0; i < mine_.size(); ++i) {
    if (chunks[i].first.empty()) continue;
    FromHostFloats(be_, mine_[i].m, chunks[i].first);
    FromHostFloats(be_, mine_[i].v, chunks[i].second);
  }
  return Status::Ok();
}

}  // namespace troupe::parallel
