#include "train/parallel/pipeline_runner.h"

#include <chrono>
#include <condition_variable>
#include <exception>
#include <future>
#include <string>
#include <thread>

#include "train/parallel/tags.h"

namespace troupe::parallel {
namespace {

std::string Chunk(ChunkRef c) { return "micro-batch " + std::to_string(c.micro) + " stage " + std::to_string(c.stage); }

// "activation for micro-batch 0 stage 1", in errors.
std::string Transfer(TagKind kind, ChunkRef c) {
  return std::string(kind == TagKind::kGradient ? "gradient" : "activation") + " for " + Chunk(c);
}

using Clock = std::chrono::steady_clock;
double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// An F&B pair's chunks split the rank's compute threads in two: with all of
// them each (measured on 16 cores, pp2 x ep2), the two teams oversubscribed
// the cores and the pair took 2.8x as long.
constexpr int kPairWays = 2;

}  // namespace

// The B of every F&B pair runs here. One long-lived thread rather than one
// per pair: the CPU backend's OpenMP team belongs to the thread that starts
// it, and a fresh thread would build a fresh team each time. On CUDA its
// kernels go to lane 1, a stream beside the F's.
class PipelineRunner::PairThread {
 public:
  PairThread(Backend& be, int ways)
      : thread_([this, &be, ways] {
          be.SetCallerShare(ways);
          be.SetCallerLane(1);
          Loop();
        }) {}
  ~PairThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::future<void> Run(std::function<void()> job) {
    std::packaged_task<void()> task(std::move(job));
    std::future<void> done = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = std::move(task);
      pending_ = true;
    }
    cv_.notify_all();
    return done;
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || pending_; });
      if (stop_) return;
      std::packaged_task<void()> task = std::move(task_);
      pending_ = false;
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::packaged_task<void()> task_;
  bool pending_ = false, stop_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

namespace {

// Calls on(sends, peer_pp_rank, kind, chunk) for every transfer of
// pp_rank's list, in the order one thread makes them (Forward, Backward).
template <typename On>
void ForEachTransfer(const Schedule& s, int pp_rank, On&& on) {
  for (const Op& op : s.per_rank[pp_rank]) {
    if (op.kind == OpKind::kForward || op.kind == OpKind::kForwardBackward) {
      const ChunkRef c = op.f;
      if (c.stage > 0) on(false, s.Place({c.micro, c.stage - 1}).rank, TagKind::kActivation, c);
      if (c.stage + 1 < s.stages)
        on(true, s.Place({c.micro, c.stage + 1}).rank, TagKind::kActivation, ChunkRef{c.micro, c.stage + 1});
    }
    if (op.kind != OpKind::kBackward && op.kind != OpKind::kForwardBackward) continue;
    const ChunkRef c = op.b;
    if (c.stage + 1 < s.stages) on(false, s.Place({c.micro, c.stage + 1}).rank, TagKind::kGradient, c);
    if (c.stage > 0) on(true, s.Place({c.micro, c.stage - 1}).rank, TagKind::kGradient, ChunkRef{c.micro, c.stage - 1});
  }
}

}  // namespace

Expected<std::vector<DeviceLink>> PipelineLinks(const Layout& layout, const Schedule& schedule) {
  std::map<DeviceLink, std::vector<ChunkRef>> sent, received;  // in issue order
  for (int w = 0; w < layout.world(); ++w) {
    const RankCoord me = layout.CoordOf(w);
    ForEachTransfer(schedule, me.pp_rank, [&](bool sends, int peer_pp, TagKind kind, ChunkRef c) {
      RankCoord peer = me;
      peer.pp_rank = peer_pp;
      const int p = layout.RankOf(peer);
      if (p == w) return;
      if (sends)
        sent[{w, p, kind}].push_back(c);
      else
        received[{p, w, kind}].push_back(c);
    });
  }
  std::vector<DeviceLink> links;
  for (auto& [link, order] : sent) {
    const std::vector<ChunkRef>& theirs = received[link];
    for (size_t i = 0; i < std::max(order.size(), theirs.size()); ++i) {
      if (i < order.size() && i < theirs.size() && order[i].micro == theirs[i].micro &&
          order[i].stage == theirs[i].stage)
        continue;
      auto name = [&](const std::vector<ChunkRef>& v) { return i < v.size() ? Chunk(v[i]) : std::string("nothing"); };
      return Status::InvalidArgument("the " + LinkName(link) + " would carry " + name(order) + " as transfer " +
                                     std::to_string(i + 1) + " where the receiver takes " + name(theirs) +
                                     " (NCCL matches by order only)");
    }
    links.push_back(link);
  }
  return links;
}

std::vector<int> SlotsNeeded(const Schedule& schedule, int pp_rank, int modules) {
  std::vector<int> live(modules, 0), most(modules, 1);
  for (const Op& op : schedule.per_rank[pp_rank]) {
    if (op.kind == OpKind::kForward || op.kind == OpKind::kForwardBackward) {
      const int m = schedule.Place(op.f).module;
      most[m] = std::max(most[m], ++live[m]);
    }
    const bool releases = schedule.split_w ? op.kind == OpKind::kWeight
                                           : (op.kind == OpKind::kBackward || op.kind == OpKind::kForwardBackward);
    if (releases) --live[schedule.Place(op.b).module];
  }
  return most;
}

PipelineRunner::PipelineRunner(const Layout& layout, const Schedule& schedule, int world_rank, ProcessGroup& group,
                               std::vector<Model*> modules, int timeout_ms, const ExpertExchange* experts,
                               bool overlap_pairs, DeviceComms* device)
    : layout_(layout),
      schedule_(schedule),
      world_rank_(world_rank),
      pp_rank_(layout.CoordOf(world_rank).pp_rank),
      group_(group),
      modules_(std::move(modules)),
      timeout_ms_(timeout_ms),
      experts_(experts),
      device_(device) {
  // A pair whose chunks share a module would race on its weights: none of
  // the built-in schedules makes one, but a schedule read from JSON could.
  bool has_pairs = false, distinct = true;
  for (const Op& op : schedule_.per_rank[pp_rank_]) {
    if (op.kind != OpKind::kForwardBackward) continue;
    has_pairs = true;
    distinct &= schedule_.Place(op.f).module != schedule_.Place(op.b).module;
  }
  // The backend is asked on this thread: the one that will run each pair's F.
  Backend& be = modules_[0]->backend();
  const bool concurrent = be.SetCallerShare(1) || be.lanes() > 1;
  if (overlap_pairs && has_pairs && distinct && concurrent) pair_thread_ = std::make_unique<PairThread>(be, kPairWays);
}

PipelineRunner::~PipelineRunner() = default;

int PipelineRunner::PeerOf(int pp_rank) const {
  RankCoord c = layout_.CoordOf(world_rank_);
  c.pp_rank = pp_rank;
  return layout_.RankOf(c);
}

DeviceComm* PipelineRunner::LinkOf(int from, int to, TagKind kind) const {
  return device_ ? device_->FindLink({from, to, kind}) : nullptr;
}

Status PipelineRunner::SendTensor(int pp_rank, TagKind kind, ChunkRef to, const Tensor& t) {
  const int peer = PeerOf(pp_rank);
  if (DeviceComm* link = LinkOf(world_rank_, peer, kind)) return link->Send(t, 1).WithContext(Transfer(kind, to));
  std::vector<uint8_t> bytes;
  bytes.reserve(t.bytes() + kSendReserveBytes);
  bytes.resize(t.bytes());
  modules_[0]->backend().CopyToHost(bytes.data(), t);
  return group_.Send(peer, ChunkTag(kind, to.micro, to.stage), std::move(bytes));
}

Status PipelineRunner::Receive(int pp_rank, TagKind kind, ChunkRef c, Tensor& into) {
  const int peer = PeerOf(pp_rank);
  const std::string what = Transfer(kind, c);
  if (DeviceComm* link = LinkOf(peer, world_rank_, kind)) {
    Status s = link->Receive(into, 0);
    if (s.ok()) {
      // The host waits here as it would for a message, and with the same
      // deadline, so a dead sender is an error rather than a device sync
      // that never returns.
      CommWaitObserver* observer = CurrentCommWaitObserver();
      if (observer) observer->OnCommWait(true);
      s = link->Wait(timeout_ms_);
      if (observer) observer->OnCommWait(false);
    }
    return s.WithContext(what);  // on failure the step aborts every link (AbortLinksOnFailure)
  }
  auto bytes = group_.Recv(peer, ChunkTag(kind, c.micro, c.stage), timeout_ms_);
  if (!bytes.ok()) return bytes.status().WithContext(what);
  if (bytes->size() != into.bytes())
    return Status::Corruption(what + " from rank " + std::to_string(peer) + " has " + std::to_string(bytes->size()) +
                              " bytes; expected " + std::to_string(into.bytes()));
  modules_[0]->backend().CopyFromHost(into, bytes->data());
  return Status::Ok();
}

Expected<int> PipelineRunner::TakeSlot(int module, ChunkRef c) {
  std::lock_guard<std::mutex> lock(book_mu_);
  if (free_slots_[module].empty())
    return Status::Internal("pipeline rank " + std::to_string(pp_rank_) + " has no free activation slot for " +
                            Chunk(c));
  const int slot = free_slots_[module].back();
  free_slots_[module].pop_back();
  return slot;
}

void PipelineRunner::ReleaseSlot(int module, int slot) {
  std::lock_guard<std::mutex> lock(book_mu_);
  free_slots_[module].push_back(slot);
}

void PipelineRunner::AddLoss(const StageLoss& l) {
  std::lock_guard<std::mutex> lock(book_mu_);
  loss_.main_sum += l.main_sum;
  loss_.main_valid += l.main_valid;
  loss_.balance_sum += l.balance_sum;
  if (loss_.mtp_sum.size() < l.mtp_sum.size()) {
    loss_.mtp_sum.resize(l.mtp_sum.size(), 0.0);
    loss_.mtp_valid.resize(l.mtp_sum.size(), 0);
  }
  for (size_t k = 0; k < l.mtp_sum.size(); ++k) {
    loss_.mtp_sum[k] += l.mtp_sum[k];
    loss_.mtp_valid[k] += l.mtp_valid[k];
  }
}

Status PipelineRunner::Forward(ChunkRef c, const MicroTokens& tokens, const LossWeights& w, bool train) {
  const Placement at = schedule_.Place(c);
  Model& m = *modules_[at.module];
  TROUPE_ASSIGN_OR_RETURN(const int slot, TakeSlot(at.module, c));
  if (c.stage > 0) {
    const Placement prev = schedule_.Place({c.micro, c.stage - 1});
    TROUPE_RETURN_IF_ERROR(Receive(prev.rank, TagKind::kActivation, c, m.StageInput(slot)));
  }
  TROUPE_ASSIGN_OR_RETURN(StageLoss l, m.ForwardStage(slot, tokens(c.micro), w, /*with_mtp=*/train));
  AddLoss(l);
  if (c.stage + 1 < schedule_.stages) {
    const Placement next = schedule_.Place({c.micro, c.stage + 1});
    TROUPE_RETURN_IF_ERROR(SendTensor(next.rank, TagKind::kActivation, {c.micro, c.stage + 1}, m.StageOutput(slot)));
  }
  if (train) {
    std::vector<std::vector<int64_t>> loads = m.ExpertLoads(slot);
    std::lock_guard<std::mutex> lock(book_mu_);
    auto& acc = loads_[at.module];
    if (acc.empty()) {
      acc = std::move(loads);
    } else {
      for (size_t i = 0; i < loads.size(); ++i)
        for (size_t e = 0; e < loads[i].size(); ++e) acc[i][e] += loads[i][e];
    }
    slot_of_[{c.micro, c.stage}] = slot;
  } else {
    ReleaseSlot(at.module, slot);  // evaluation keeps nothing for a backward
  }
  return Status::Ok();
}

Status PipelineRunner::Backward(ChunkRef c, const LossScale& scale) {
  const Placement at = schedule_.Place(c);
  Model& m = *modules_[at.module];
  int slot = -1;
  WeightGradQueue* defer = nullptr;
  {
    std::lock_guard<std::mutex> lock(book_mu_);
    auto it = slot_of_.find({c.micro, c.stage});
    if (it == slot_of_.end()) return Status::Internal("backward of " + Chunk(c) + " before its forward");
    slot = it->second;
    if (schedule_.split_w) defer = &deferred_[{c.micro, c.stage}];  // map nodes stay put while others come and go
  }
  if (c.stage + 1 < schedule_.stages) {
    const Placement next = schedule_.Place({c.micro, c.stage + 1});
    TROUPE_RETURN_IF_ERROR(Receive(next.rank, TagKind::kGradient, c, m.OutputGrad()));
  }
  m.BackwardStage(slot, scale, defer);
  if (c.stage > 0) {
    const Placement prev = schedule_.Place({c.micro, c.stage - 1});
    TROUPE_RETURN_IF_ERROR(SendTensor(prev.rank, TagKind::kGradient, {c.micro, c.stage - 1}, m.InputGrad()));
  }
  if (!defer) {
    std::lock_guard<std::mutex> lock(book_mu_);
    slot_of_.erase({c.micro, c.stage});
    free_slots_[at.module].push_back(slot);
  }
  return Status::Ok();
}

Status PipelineRunner::Weight(ChunkRef c) {
  auto q = deferred_.find({c.micro, c.stage});
  auto it = slot_of_.find({c.micro, c.stage});
  if (q == deferred_.end() || it == slot_of_.end()) return Status::Internal("W of " + Chunk(c) + " before its B");
  const Placement at = schedule_.Place(c);
  q->second.Run(modules_[at.module]->backend());
  deferred_.erase(q);
  free_slots_[at.module].push_back(it->second);
  slot_of_.erase(it);
  return Status::Ok();
}

Status PipelineRunner::RunPair(const Op& op, const MicroTokens& tokens, const LossWeights& w, const LossScale& scale) {
  if (!pair_thread_) {
    // One thread: the pair's transfers still overlap each other's compute
    // through the group's threads (F's output is queued before B starts, and
    // B's input was buffered during F).
    TROUPE_RETURN_IF_ERROR(Forward(op.f, tokens, w, true));
    return Backward(op.b, scale);
  }
  // The first lane to fail aborts the group, so the other one stops waiting
  // at once instead of after its receive timeouts (a failed step ends the
  // job anyway); the pair reports that first failure, not the abort it caused.
  std::mutex failure_mu;
  Status first_failure;
  auto lane_done = [&](int lane, const Status& s) {
    meter_.SetDone(lane);
    if (s.ok()) return;
    std::lock_guard<std::mutex> lock(failure_mu);
    if (first_failure.ok()) {
      first_failure = s;
      const std::string why = "pipeline rank " + std::to_string(pp_rank_) + ": " + s.message();
      group_.Abort(why);
      if (device_) device_->AbortAll(why);  // the other lane may wait on a link or an expert communicator
    }
  };
  Backend& be = modules_[0]->backend();
  be.OrderLanes();  // B's lane starts after everything before the pair (its activations, its gradient's sources)
  std::future<void> b = pair_thread_->Run([&] {
    ScopedCommWaitObserver observe(meter_.lane(1));
    lane_done(1, Backward(op.b, scale));
  });
  // B uses this frame and this runner: it is joined, the lanes with it, and
  // the thread share restored, on every way out. An exception out of F
  // counts as F's failure, so B stops waiting for its peers at once.
  struct JoinB {
    std::future<void>& b;
    Backend& be;
    std::function<void(int, const Status&)> done;
    ~JoinB() {
      if (std::uncaught_exceptions() > 0) done(0, Status::Internal("the pair's forward chunk threw"));
      be.SetCallerShare(1);
      if (b.valid()) b.wait();
      be.OrderLanes();
    }
  } join{b, be, lane_done};
  be.SetCallerShare(kPairWays);
  lane_done(0, Forward(op.f, tokens, w, true));
  b.get();
  std::lock_guard<std::mutex> lock(failure_mu);
  return first_failure;
}

Status PipelineRunner::RunTrainStep(const MicroTokens& tokens, const LossWeights& w, const LossScale& scale) {
  return AbortLinksOnFailure(TrainOps(tokens, w, scale));
}

Status PipelineRunner::RunForwardOnly(const MicroTokens& tokens, const LossWeights& w) {
  return AbortLinksOnFailure(ForwardOps(tokens, w));
}

Status PipelineRunner::AbortLinksOnFailure(Status s) {
  // A step that stops early leaves sends queued for receivers that will not
  // come: aborting ends their kernels, so nothing later (a device sync, the
  // exit) waits on them.
  if (!s.ok() && device_) device_->AbortAll(s.message());
  return s;
}

Status PipelineRunner::TrainOps(const MicroTokens& tokens, const LossWeights& w, const LossScale& scale) {
  loss_ = StageLoss{};
  loads_.assign(modules_.size(), {});
  timeline_.clear();
  free_slots_.assign(modules_.size(), {});
  for (size_t i = 0; i < modules_.size(); ++i)
    for (int s = modules_[i]->slots() - 1; s >= 0; --s) free_slots_[i].push_back(s);
  slot_of_.clear();
  deferred_.clear();
  const auto t0 = Clock::now();
  auto since = [&t0] { return Seconds(Clock::now() - t0); };
  ScopedCommWaitObserver observe(meter_.lane(0));
  for (const Op& op : schedule_.per_rank[pp_rank_]) {
    OpRecord rec{op.kind, op.f, op.b, since(), 0};
    meter_.Start(op.kind == OpKind::kForwardBackward && pair_thread_ ? 2 : 1);  // lanes: F, and B on the pair thread
    switch (op.kind) {
      case OpKind::kForward:
        TROUPE_RETURN_IF_ERROR(Forward(op.f, tokens, w, true));
        break;
      case OpKind::kBackward:
        TROUPE_RETURN_IF_ERROR(Backward(op.b, scale));
        break;
      case OpKind::kForwardBackward:
        TROUPE_RETURN_IF_ERROR(RunPair(op, tokens, w, scale));
        break;
      case OpKind::kWeight:
        TROUPE_RETURN_IF_ERROR(Weight(op.b));
        break;
    }
    const OverlapMeter::Totals t = meter_.Finish();
    rec.end = since();
    rec.wait = t.exposed_s;
    rec.waited = t.waited_s;
    rec.hidden = t.hidden_s;
    timeline_.push_back(rec);
    if (experts_ && !experts_->status().ok())
      return experts_->status().WithContext("expert all-to-all in " + OpToString(op));
  }
  if (!slot_of_.empty()) return Status::Internal("schedule left micro-batches without a backward");
  return WaitForSends();
}

Status PipelineRunner::WaitForSends() {
  // Every receiver takes our sends within its own step: a send still queued
  // past the deadline means it stopped.
  return device_ ? device_->WaitAll(timeout_ms_).WithContext("pipeline sends at the end of the step") : Status::Ok();
}

Status PipelineRunner::ForwardOps(const MicroTokens& tokens, const LossWeights& w) {
  loss_ = StageLoss{};
  free_slots_.assign(modules_.size(), {});
  for (size_t i = 0; i < modules_.size(); ++i) free_slots_[i].push_back(0);
  for (const Op& op : schedule_.per_rank[pp_rank_]) {
    if (op.kind == OpKind::kForward || op.kind == OpKind::kForwardBackward)
      TROUPE_RETURN_IF_ERROR(Forward(op.f, tokens, w, /*train=*/false));
    if (experts_ && !experts_->status().ok())
      return experts_->status().WithContext("expert all-to-all in " + OpToString(op));
  }
  return WaitForSends();
}

}  // namespace troupe::parallel
