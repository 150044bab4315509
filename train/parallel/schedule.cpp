// Pipeline schedule generation (BRIEF §2): names, placement, the builders of
// 1F1B / ZB1P / DualPipe / DualPipeV, and the JSON form. The checker and the
// simulator live in schedule_sim.cpp.
//
// Every schedule is written with the verbs of the public DualPipe step()
// (Forward, Backward, ForwardBackward, Weight) on a RankProgram, so the steps
// below read like the reference's and DualPipeV shares DualPipe's eight steps
// instead of copying them.
#include "train/parallel/schedule.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <utility>

namespace troupe::parallel {
namespace {

constexpr const char* kFormat = "troupe.pipeline_schedule";
constexpr int kFormatVersion = 1;
// Chunks (micro-batches x stages) beyond this are surely a typo, and would only exhaust memory.
constexpr long kMaxChunks = 1L << 24;

// One rank's op list. A "phase" is one of the rank's (at most two) stage
// copies as the rank sees it; chunk(phase, k) names the k-th micro-batch that
// phase runs. Forwards and backwards of a phase both go in micro-batch order
// (FIFO), as in the reference.
class RankProgram {
 public:
  using ChunkOf = std::function<ChunkRef(int phase, int k)>;
  RankProgram(bool split_w, ChunkOf chunk) : split_w_(split_w), chunk_(std::move(chunk)) {}

  void Forward(int phase) { ops_.push_back({OpKind::kForward, NextF(phase), {}}); }
  // B; its W follows at once unless `defer_w` queues it for a later Weight().
  void Backward(int phase, bool defer_w) {
    const ChunkRef b = NextB(phase);
    ops_.push_back({OpKind::kBackward, {}, b});
    AfterBackward(b, defer_w);
  }
  // F&B. Like the reference, the pair's backward is a full one: its W is never deferred.
  void ForwardBackward(int f_phase, int b_phase) {
    const ChunkRef f = NextF(f_phase), b = NextB(b_phase);
    ops_.push_back({OpKind::kForwardBackward, f, b});
    AfterBackward(b, /*defer_w=*/false);
  }
  // The oldest deferred W. Without split_w there is nothing to run: B did it.
  void Weight() {
    if (!split_w_) return;
    if (deferred_w_.empty()) {
      underflow_ = true;
      return;
    }
    ops_.push_back({OpKind::kWeight, {}, deferred_w_.front()});
    deferred_w_.pop_front();
  }
  int deferred() const { return static_cast<int>(deferred_w_.size()); }

  // The ops, once every phase ran `per_phase[phase]` forwards and backwards
  // and no W is left queued; anything else is a bug in the steps.
  Expected<std::vector<Op>> Finish(const int per_phase[2], int rank) && {
    for (int p = 0; p < 2; ++p)
      if (f_next_[p] != per_phase[p] || b_next_[p] != per_phase[p] || underflow_ || !deferred_w_.empty())
        return Status::Internal("schedule builder: rank " + std::to_string(rank) + " phase " + std::to_string(p) +
                                " ran " + std::to_string(f_next_[p]) + " F and " + std::to_string(b_next_[p]) +
                                " B of " + std::to_string(per_phase[p]) + ", " + std::to_string(deferred()) +
                                " W left queued" + (underflow_ ? ", W with none queued" : ""));
    return std::move(ops_);
  }

 private:
  ChunkRef NextF(int phase) { return chunk_(phase, f_next_[phase]++); }
  ChunkRef NextB(int phase) { return chunk_(phase, b_next_[phase]++); }
  void AfterBackward(ChunkRef b, bool defer_w) {
    if (!split_w_) return;
    if (defer_w) {
      deferred_w_.push_back(b);
    } else {
      ops_.push_back({OpKind::kWeight, {}, b});
    }
  }

  bool split_w_;
  ChunkOf chunk_;
  std::vector<Op> ops_;
  int f_next_[2] = {0, 0};
  int b_next_[2] = {0, 0};
  std::deque<ChunkRef> deferred_w_;  // B ran, W not yet (FIFO, like WeightGradStore)
  bool underflow_ = false;
};

// 1F1B and ZB-H1 on one rank, phase 0 only. `lag` W's stay queued behind their
// B's: 0 runs each W right after its B (1F1B). ZB-H1 uses lag = rank: the
// deferred W's fill the cool-down, where a rank otherwise waits for the
// gradients of the stages after it, and rank r then holds at most
// (ranks-1-r) warm-up + 1 + r = ranks micro-batches of activations, which is
// 1F1B's peak (on rank 0).
void OneFOneBSteps(int ranks, int rank, int micro_batches, int lag, RankProgram& p) {
  const int warmup = std::min(ranks - 1 - rank, micro_batches);
  auto backward = [&] {
    p.Backward(0, /*defer_w=*/true);
    if (p.deferred() > lag) p.Weight();
  };
  // Warm-up: nF
  for (int i = 0; i < warmup; ++i) p.Forward(0);
  // Steady: nFB
  for (int i = warmup; i < micro_batches; ++i) {
    p.Forward(0);
    backward();
  }
  // Cool-down: nB
  for (int i = 0; i < warmup; ++i) backward();
  // Drain: nW
  while (p.deferred() > 0) p.Weight();
}

// One rank of DualPipe's step(). DualPipeV is DualPipe's first half of the
// ranks stretched to all of them, so the same steps serve both.
struct BidiRank {
  int half_ranks;   // N/2 for DualPipe, N for DualPipeV
  int half_rank;    // h: min(r, N-1-r) for DualPipe, r for DualPipeV
  int half_chunks;  // micro-batches per phase: C/2 for DualPipe, C for DualPipeV
  bool middle;      // the rank where the two directions meet: h == half_ranks-1
};

void DualPipeSteps(const BidiRank& r, RankProgram& p) {
  const int n = r.half_ranks, h = r.half_rank;
  // Step 1: nF0
  const int step_1 = 2 * (n - h - 1);
  for (int i = 0; i < step_1; ++i) p.Forward(0);
  // Step 2: nF0F1
  const int step_2 = h + 1;
  for (int i = 0; i < step_2; ++i) {
    p.Forward(0);
    p.Forward(1);
  }
  // Step 3: nB1W1F1 (zero bubble: the W waits one op, so B1's gradient leaves first)
  const int step_3 = n - h - 1;
  for (int i = 0; i < step_3; ++i) {
    p.Backward(1, /*defer_w=*/true);
    p.Weight();
    p.Forward(1);
  }
  // Step 4 (main): nF0B1F1B0
  const int step_4 = r.half_chunks - 2 * n + h + 1;
  for (int i = 0; i < step_4; ++i) {
    if (i == 0 && r.middle) {
      // Not overlapped: the reference keeps these two apart "to further reduce
      // bubble size". F0 is the first chunk to cross the meeting point, and
      // run alone it is ready after F instead of after a whole F&B.
      p.Forward(0);
      p.Backward(1, /*defer_w=*/false);
    } else {
      p.ForwardBackward(0, 1);
    }
    p.ForwardBackward(1, 0);
  }
  // Step 5: nB1F1B0
  const int step_5 = n - h - 1;
  for (int i = 0; i < step_5; ++i) {
    p.Backward(1, /*defer_w=*/false);
    p.ForwardBackward(1, 0);
  }
  // Step 6: nB1B0 (the second half defers W, to fill the waits of steps 7-8)
  const int step_6 = h + 1;
  bool defer_w = false;
  for (int i = 0; i < step_6; ++i) {
    if (i == step_6 / 2 && h % 2 == 1) defer_w = true;
    p.Backward(1, defer_w);
    if (i == step_6 / 2 && h % 2 == 0) defer_w = true;
    p.Backward(0, defer_w);
  }
  // Step 7: nWB0
  const int step_7 = n - h - 1;
  for (int i = 0; i < step_7; ++i) {
    p.Weight();
    p.Backward(0, /*defer_w=*/true);
  }
  // Step 8: nW
  const int step_8 = h + 1;
  for (int i = 0; i < step_8; ++i) p.Weight();
}

Status Refuse(ScheduleKind kind, const std::string& why) {
  return Status::InvalidArgument(std::string(ScheduleKindName(kind)) + " schedule: " + why);
}

Status CheckParameters(ScheduleKind kind, int ranks, int micro_batches) {
  const std::string pp = std::to_string(ranks), c = std::to_string(micro_batches);
  if (ranks < 1) return Refuse(kind, "needs at least 1 rank, not " + pp);
  if (micro_batches < 1) return Refuse(kind, "needs at least 1 micro-batch, not " + c);
  if (static_cast<long>(StageCount(kind, ranks)) * micro_batches > kMaxChunks)
    return Refuse(kind, pp + " ranks x " + c + " micro-batches is more chunks than " + std::to_string(kMaxChunks));
  if (kind == ScheduleKind::kDualPipe) {
    if (ranks % 2 != 0)
      return Refuse(kind, "needs an even number of ranks (rank r pairs stage r with PP-1-r), not " + pp);
    if (micro_batches % 2 != 0)
      return Refuse(kind, "needs an even number of micro-batches (half enter at each end), not " + c);
  }
  if ((kind == ScheduleKind::kDualPipe || kind == ScheduleKind::kDualPipeV) && micro_batches < 2 * ranks)
    return Refuse(kind, "needs micro-batches >= 2 x ranks = " + std::to_string(2 * ranks) + ", not " + c);
  return Status::Ok();
}

}  // namespace

const char* ScheduleKindName(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::k1F1B:
      return "1f1b";
    case ScheduleKind::kZB1P:
      return "zb1p";
    case ScheduleKind::kDualPipe:
      return "dualpipe";
    case ScheduleKind::kDualPipeV:
      return "dualpipev";
  }
  return "?";
}

Expected<ScheduleKind> ParseScheduleKind(const std::string& name) {
  for (ScheduleKind k : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe, ScheduleKind::kDualPipeV})
    if (name == ScheduleKindName(k)) return k;
  return Status::InvalidArgument("unknown pipeline schedule '" + name +
                                 "' (expected 1f1b, zb1p, dualpipe or dualpipev)");
}

const char* OpKindName(OpKind kind) {
  switch (kind) {
    case OpKind::kForward:
      return "F";
    case OpKind::kBackward:
      return "B";
    case OpKind::kWeight:
      return "W";
    case OpKind::kForwardBackward:
      return "FB";
  }
  return "?";
}

std::string OpToString(const Op& op) {
  auto ref = [](ChunkRef c) {
    std::string out("m");  // appended, not "m" + ...: GCC 12 warns falsely (-Wrestrict) on that
    out += std::to_string(c.micro);
    out += ",s";
    out += std::to_string(c.stage);
    return out;
  };
  switch (op.kind) {
    case OpKind::kForward:
      return "F(" + ref(op.f) + ")";
    case OpKind::kForwardBackward:
      return "FB(" + ref(op.f) + "|" + ref(op.b) + ")";
    default:
      return std::string(OpKindName(op.kind)) + "(" + ref(op.b) + ")";
  }
}

std::string RankOpsToString(const Schedule& s, int rank) {
  auto chunk = [&](char kind, ChunkRef c) {
    return kind + std::to_string(c.micro) + (s.Place(c).module == 1 ? "'" : "");
  };
  std::string out;
  for (const Op& op : s.per_rank[rank]) {
    if (!out.empty()) out += ' ';
    switch (op.kind) {
      case OpKind::kForward:
        out += chunk('F', op.f);
        break;
      case OpKind::kBackward:
        out += chunk('B', op.b);
        break;
      case OpKind::kWeight:
        out += chunk('W', op.b);
        break;
      case OpKind::kForwardBackward:
        out += chunk('F', op.f) + "+" + chunk('B', op.b);
        break;
    }
  }
  return out;
}

int StageCount(ScheduleKind kind, int ranks) { return kind == ScheduleKind::kDualPipeV ? 2 * ranks : ranks; }

Placement Schedule::Place(ChunkRef c) const {
  switch (kind) {
    case ScheduleKind::kDualPipe:
      if (c.micro < micro_batches / 2) return {c.stage, 0};
      return {ranks - 1 - c.stage, 1};
    case ScheduleKind::kDualPipeV:
      if (c.stage < ranks) return {c.stage, 0};
      return {2 * ranks - 1 - c.stage, 1};
    default:
      return {c.stage, 0};
  }
}

Expected<Schedule> BuildSchedule(ScheduleKind kind, int ranks, int micro_batches, bool split_w) {
  TROUPE_RETURN_IF_ERROR(CheckParameters(kind, ranks, micro_batches));
  Schedule s;
  s.kind = kind;
  s.ranks = ranks;
  s.stages = StageCount(kind, ranks);
  s.micro_batches = micro_batches;
  s.split_w = split_w;
  const int c = micro_batches, n = ranks;
  for (int r = 0; r < n; ++r) {
    RankProgram::ChunkOf chunk;
    int per_phase[2] = {c, 0};
    switch (kind) {
      case ScheduleKind::k1F1B:
      case ScheduleKind::kZB1P:
        chunk = [r](int, int k) { return ChunkRef{k, r}; };
        break;
      case ScheduleKind::kDualPipe:
        // Phase 0 is the direction that reaches rank r first: down (module 0)
        // on the first half of the ranks, up (module 1) on the second.
        chunk = [r, n, c](int phase, int k) {
          return (phase ^ (r >= n / 2)) == 0 ? ChunkRef{k, r} : ChunkRef{c / 2 + k, n - 1 - r};
        };
        per_phase[0] = per_phase[1] = c / 2;
        break;
      case ScheduleKind::kDualPipeV:
        chunk = [r, n](int phase, int k) { return phase == 0 ? ChunkRef{k, r} : ChunkRef{k, 2 * n - 1 - r}; };
        per_phase[1] = c;
        break;
    }
    RankProgram program(split_w, std::move(chunk));
    switch (kind) {
      case ScheduleKind::k1F1B:
        OneFOneBSteps(n, r, c, /*lag=*/0, program);
        break;
      case ScheduleKind::kZB1P:
        OneFOneBSteps(n, r, c, /*lag=*/r, program);
        break;
      case ScheduleKind::kDualPipe: {
        const int h = std::min(r, n - 1 - r);
        DualPipeSteps({n / 2, h, c / 2, h == n / 2 - 1}, program);
        break;
      }
      case ScheduleKind::kDualPipeV:
        DualPipeSteps({n, r, c, r == n - 1}, program);
        break;
    }
    TROUPE_ASSIGN_OR_RETURN(std::vector<Op> ops, std::move(program).Finish(per_phase, r));
    s.per_rank.push_back(std::move(ops));
  }
  return s;
}

// ---- JSON ----------------------------------------------------------------

nlohmann::json ScheduleToJson(const Schedule& s, const SimResult* sim) {
  using nlohmann::json;
  json placement = json::array();
  for (int m = 0; m < s.micro_batches; ++m) {
    json row = json::array();
    for (int st = 0; st < s.stages; ++st) {
      const Placement p = s.Place({m, st});
      row.push_back({p.rank, p.module});
    }
    placement.push_back(std::move(row));
  }
  json per_rank = json::array();
  for (const std::vector<Op>& ops : s.per_rank) {
    json list = json::array();
    for (const Op& op : ops) {
      if (op.kind == OpKind::kForwardBackward) {
        list.push_back({{"op", "FB"},
                        {"f_micro", op.f.micro},
                        {"f_stage", op.f.stage},
                        {"b_micro", op.b.micro},
                        {"b_stage", op.b.stage}});
      } else {
        const ChunkRef c = op.kind == OpKind::kForward ? op.f : op.b;
        list.push_back({{"op", OpKindName(op.kind)}, {"micro", c.micro}, {"stage", c.stage}});
      }
    }
    per_rank.push_back(std::move(list));
  }
  json j = {{"format", kFormat},
            {"version", kFormatVersion},
            {"kind", ScheduleKindName(s.kind)},
            {"ranks", s.ranks},
            {"stages", s.stages},
            {"micro_batches", s.micro_batches},
            {"split_w", s.split_w},
            {"placement", std::move(placement)},
            {"per_rank", std::move(per_rank)}};
  if (sim != nullptr) {
    json timing = json::array();
    for (const std::vector<OpTiming>& rank : sim->timing) {
      json list = json::array();
      for (const OpTiming& t : rank) list.push_back({t.start, t.end});
      timing.push_back(std::move(list));
    }
    j["simulation"] = {
        {"costs", {{"f", sim->costs.f}, {"b", sim->costs.b}, {"w", sim->costs.w}, {"fb", sim->costs.FB()}}},
        {"makespan", sim->makespan},
        {"busy", sim->busy},
        {"bubble", sim->bubble},
        {"timing", std::move(timing)}};
  }
  return j;
}

namespace {

Status Bad(const std::string& why) { return Status::Corruption("pipeline schedule JSON: " + why); }

Status GetInt(const nlohmann::json& j, const char* key, int& out, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return Bad(where + " lacks the whole number '" + key + "'");
  const auto v = it->get<int64_t>();
  if (v < 0 || v > (1L << 30)) return Bad(where + " '" + key + "' = " + std::to_string(v) + " is out of range");
  out = static_cast<int>(v);
  return Status::Ok();
}

// j[key] when it is a string, else "" (nlohmann's value() throws on a wrong type).
std::string StringOr(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace

Expected<Schedule> ScheduleFromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Bad("not an object");
  if (StringOr(j, "format") != kFormat) return Bad("format is not '" + std::string(kFormat) + "'");
  int version = 0;
  TROUPE_RETURN_IF_ERROR(GetInt(j, "version", version, "the schedule"));
  if (version != kFormatVersion)
    return Bad("version " + std::to_string(version) + " (this build reads " + std::to_string(kFormatVersion) + ")");
  Schedule s;
  auto kind = ParseScheduleKind(StringOr(j, "kind"));
  if (!kind.ok()) return Bad(kind.status().message());
  s.kind = *kind;
  TROUPE_RETURN_IF_ERROR(GetInt(j, "ranks", s.ranks, "the schedule"));
  TROUPE_RETURN_IF_ERROR(GetInt(j, "stages", s.stages, "the schedule"));
  TROUPE_RETURN_IF_ERROR(GetInt(j, "micro_batches", s.micro_batches, "the schedule"));
  auto split_it = j.find("split_w");
  if (split_it == j.end() || !split_it->is_boolean()) return Bad("the schedule lacks the true/false 'split_w'");
  s.split_w = split_it->get<bool>();
  auto ranks_it = j.find("per_rank");
  if (ranks_it == j.end() || !ranks_it->is_array()) return Bad("the schedule lacks the array 'per_rank'");
  for (const nlohmann::json& list : *ranks_it) {
    const std::string where = "rank " + std::to_string(s.per_rank.size());
    if (!list.is_array()) return Bad(where + " is not an array of ops");
    std::vector<Op>& ops = s.per_rank.emplace_back();
    for (const nlohmann::json& jo : list) {
      const std::string at = where + " op " + std::to_string(ops.size());
      if (!jo.is_object()) return Bad(at + " is not an object");
      const std::string name = StringOr(jo, "op");
      Op op;
      if (name == "FB") {
        op.kind = OpKind::kForwardBackward;
        TROUPE_RETURN_IF_ERROR(GetInt(jo, "f_micro", op.f.micro, at));
        TROUPE_RETURN_IF_ERROR(GetInt(jo, "f_stage", op.f.stage, at));
        TROUPE_RETURN_IF_ERROR(GetInt(jo, "b_micro", op.b.micro, at));
        TROUPE_RETURN_IF_ERROR(GetInt(jo, "b_stage", op.b.stage, at));
      } else if (name == "F" || name == "B" || name == "W") {
        op.kind = name == "F" ? OpKind::kForward : name == "B" ? OpKind::kBackward : OpKind::kWeight;
        ChunkRef& c = op.kind == OpKind::kForward ? op.f : op.b;
        TROUPE_RETURN_IF_ERROR(GetInt(jo, "micro", c.micro, at));
        TROUPE_RETURN_IF_ERROR(GetInt(jo, "stage", c.stage, at));
      } else {
        return Bad(at + " has op '" + name + "' (expected F, B, W or FB)");
      }
      ops.push_back(op);
    }
  }
  return s;
}

}  // namespace troupe::parallel
