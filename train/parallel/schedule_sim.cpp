// The pipeline schedule checker and simulator: both replay the ranks' op
// lists on an ideal machine (an op starts once its rank is free and its inputs
// exist; sends never block), the checker to prove the schedule runs to the
// end, the simulator to price it.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <deque>
#include <functional>

#include "train/parallel/schedule.h"

namespace troupe::parallel {
namespace {

// What an op produces: the forward output, input gradient or weight gradient of one chunk.
enum class Product { kF = 0, kB = 1, kW = 2 };

struct Item {
  Product what;
  ChunkRef c;
};

std::string ItemToString(const Item& it) {
  static const char* kNames[] = {"F", "B", "W"};
  return std::string(kNames[static_cast<int>(it.what)]) + "(m" + std::to_string(it.c.micro) + ",s" +
         std::to_string(it.c.stage) + ")";
}

// An op's inputs and outputs.
struct OpIo {
  std::array<Item, 3> in;
  int n_in = 0;
  std::array<Item, 2> out;
  int n_out = 0;
};

OpIo IoOf(const Op& op, int stages) {
  OpIo io;
  const bool has_f = op.kind == OpKind::kForward || op.kind == OpKind::kForwardBackward;
  const bool has_b = op.kind == OpKind::kBackward || op.kind == OpKind::kForwardBackward;
  if (has_f) {
    if (op.f.stage > 0) io.in[io.n_in++] = {Product::kF, {op.f.micro, op.f.stage - 1}};
    io.out[io.n_out++] = {Product::kF, op.f};
  }
  if (has_b) {
    io.in[io.n_in++] = {Product::kF, op.b};
    if (op.b.stage < stages - 1) io.in[io.n_in++] = {Product::kB, {op.b.micro, op.b.stage + 1}};
    io.out[io.n_out++] = {Product::kB, op.b};
  }
  if (op.kind == OpKind::kWeight) {
    io.in[io.n_in++] = {Product::kB, op.b};
    io.out[io.n_out++] = {Product::kW, op.b};
  }
  return io;
}

// Where each product is made: a dense table over (product, micro, stage).
struct Producers {
  int micro_batches = 0, stages = 0;
  struct Site {
    int rank = -1;
    int op = -1;
  };
  std::vector<Site> site;
  int Index(const Item& it) const {
    return (static_cast<int>(it.what) * micro_batches + it.c.micro) * stages + it.c.stage;
  }
  const Site& At(const Item& it) const { return site[Index(it)]; }
};

std::string OpAt(int rank, int i, const Op& op) {
  return "rank " + std::to_string(rank) + " op " + std::to_string(i) + " " + OpToString(op);
}

// Everything but deadlock: shape, ranges, placement, the multiset of ops, and
// the order of dependencies that stay on one rank. Fills `producers`.
Status CheckStatic(const Schedule& s, Producers& producers) {
  auto bad = [](const std::string& why) { return Status::InvalidArgument("pipeline schedule: " + why); };
  if (s.ranks < 1 || s.micro_batches < 1) return bad("needs at least 1 rank and 1 micro-batch");
  if (s.stages != StageCount(s.kind, s.ranks))
    return bad(std::string(ScheduleKindName(s.kind)) + " on " + std::to_string(s.ranks) + " ranks has " +
               std::to_string(StageCount(s.kind, s.ranks)) + " stages, not " + std::to_string(s.stages));
  if (static_cast<int>(s.per_rank.size()) != s.ranks)
    return bad("has op lists for " + std::to_string(s.per_rank.size()) + " ranks, not " + std::to_string(s.ranks));
  producers = {s.micro_batches, s.stages, {}};
  producers.site.resize(static_cast<size_t>(3) * s.micro_batches * s.stages);
  auto in_range = [&](ChunkRef c) {
    return c.micro >= 0 && c.micro < s.micro_batches && c.stage >= 0 && c.stage < s.stages;
  };
  for (int r = 0; r < s.ranks; ++r) {
    const std::vector<Op>& ops = s.per_rank[r];
    for (int i = 0; i < static_cast<int>(ops.size()); ++i) {
      const Op& op = ops[i];
      if (op.kind == OpKind::kWeight && !s.split_w)
        return bad(OpAt(r, i, op) + ": the schedule is not split_w, so weight gradients belong to B");
      const OpIo io = IoOf(op, s.stages);
      for (int k = 0; k < io.n_out; ++k) {
        const Item& out = io.out[k];
        if (!in_range(out.c))
          return bad(OpAt(r, i, op) + ": outside " + std::to_string(s.micro_batches) + " micro-batches x " +
                     std::to_string(s.stages) + " stages");
        const Placement p = s.Place(out.c);
        if (p.rank != r)
          return bad(OpAt(r, i, op) + ": stage " + std::to_string(out.c.stage) + " of micro-batch " +
                     std::to_string(out.c.micro) + " runs on rank " + std::to_string(p.rank));
        Producers::Site& site = producers.site[producers.Index(out)];
        if (site.rank >= 0)
          return bad(ItemToString(out) + " runs twice: rank " + std::to_string(site.rank) + " op " +
                     std::to_string(site.op) + " and rank " + std::to_string(r) + " op " + std::to_string(i));
        site = {r, i};
      }
    }
  }
  // Missing ops, named by the rank that should run them.
  std::string missing;
  int n_missing = 0;
  for (int m = 0; m < s.micro_batches; ++m)
    for (int st = 0; st < s.stages; ++st)
      for (Product what : {Product::kF, Product::kB, Product::kW}) {
        const Item it{what, {m, st}};
        if (what == Product::kW && !s.split_w) continue;
        if (producers.At(it).rank >= 0) continue;
        if (n_missing++ < 4)
          missing += (missing.empty() ? "" : "; ") + std::string("rank ") + std::to_string(s.Place(it.c).rank) +
                     " never runs " + ItemToString(it);
      }
  if (n_missing > 0)
    return bad(missing + (n_missing > 4 ? "; ... (" + std::to_string(n_missing) + " ops missing)" : ""));
  // A dependency made on the same rank must come earlier on that rank.
  for (int r = 0; r < s.ranks; ++r) {
    const std::vector<Op>& ops = s.per_rank[r];
    for (int i = 0; i < static_cast<int>(ops.size()); ++i) {
      const OpIo io = IoOf(ops[i], s.stages);
      for (int k = 0; k < io.n_in; ++k) {
        const Producers::Site& site = producers.At(io.in[k]);
        if (site.rank == r && site.op >= i)
          return bad(OpAt(r, i, ops[i]) + " needs " + ItemToString(io.in[k]) + ", which rank " + std::to_string(r) +
                     (site.op == i ? " makes in the same op" : " runs later (op " + std::to_string(site.op) + ")"));
      }
    }
  }
  return Status::Ok();
}

// Runs the ranks in order on an ideal machine; `cost(op)` is how long an op
// computes. Fills `timing` ([rank][op]); reports where every stuck rank waits
// if the ranks cannot all finish. Requires CheckStatic to have passed.
Status Replay(const Schedule& s, const Producers& producers, const std::function<double(const Op&)>& cost,
              std::vector<std::vector<OpTiming>>& timing) {
  std::vector<double> ready(producers.site.size(), -1);  // when each product exists; -1: not yet
  std::vector<int> next(s.ranks, 0), blocked_on(s.ranks, -1);
  std::vector<double> free_at(s.ranks, 0);
  timing.assign(s.ranks, {});
  for (int r = 0; r < s.ranks; ++r) timing[r].resize(s.per_rank[r].size());
  std::deque<int> runnable;
  for (int r = 0; r < s.ranks; ++r) runnable.push_back(r);
  while (!runnable.empty()) {
    const int r = runnable.front();
    runnable.pop_front();
    const std::vector<Op>& ops = s.per_rank[r];
    while (next[r] < static_cast<int>(ops.size())) {
      const Op& op = ops[next[r]];
      const OpIo io = IoOf(op, s.stages);
      double start = free_at[r];
      for (int k = 0; k < io.n_in && blocked_on[r] < 0; ++k) {
        const int idx = producers.Index(io.in[k]);
        if (ready[idx] < 0) blocked_on[r] = idx;
        start = std::max(start, ready[idx]);
      }
      if (blocked_on[r] >= 0) break;  // woken when that input exists
      const double end = start + cost(op);
      timing[r][next[r]] = {start, end};
      free_at[r] = end;
      ++next[r];
      for (int k = 0; k < io.n_out; ++k) {
        const int idx = producers.Index(io.out[k]);
        ready[idx] = end;
        for (int q = 0; q < s.ranks; ++q)
          if (blocked_on[q] == idx) {
            blocked_on[q] = -1;
            runnable.push_back(q);
          }
      }
    }
  }
  std::string stuck;
  for (int r = 0; r < s.ranks; ++r) {
    if (next[r] == static_cast<int>(s.per_rank[r].size())) continue;
    const Op& op = s.per_rank[r][next[r]];
    const OpIo io = IoOf(op, s.stages);
    for (int k = 0; k < io.n_in; ++k) {
      if (ready[producers.Index(io.in[k])] >= 0) continue;
      const Producers::Site& site = producers.At(io.in[k]);
      stuck += (stuck.empty() ? "" : "; ") + OpAt(r, next[r], op) + " waits for " + ItemToString(io.in[k]) + " (rank " +
               std::to_string(site.rank) + " op " + std::to_string(site.op) + ")";
      break;
    }
  }
  if (!stuck.empty()) return Status::InvalidArgument("pipeline schedule deadlocks: " + stuck);
  return Status::Ok();
}

}  // namespace

Status CheckSchedule(const Schedule& schedule) {
  Producers producers;
  TROUPE_RETURN_IF_ERROR(CheckStatic(schedule, producers));
  std::vector<std::vector<OpTiming>> timing;
  auto unit_cost = [](const Op&) { return 1.0; };  // deadlock does not depend on costs
  return Replay(schedule, producers, unit_cost, timing);
}

Status ValidateCosts(const OpCosts& c) {
  auto num = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return std::string(buf);
  };
  for (double v : {c.f, c.b, c.w})
    if (!(v >= 0) || !std::isfinite(v))
      return Status::InvalidArgument("op costs must be finite and >= 0 (F " + num(c.f) + ", B " + num(c.b) + ", W " +
                                     num(c.w) + ")");
  if (c.w > c.b)
    return Status::InvalidArgument("op costs: W (" + num(c.w) + ") is part of B (" + num(c.b) +
                                   "), so cannot exceed it");
  if (!std::isfinite(c.fb) || c.FB() < c.w)
    return Status::InvalidArgument("op costs: F&B (" + num(c.FB()) + ") holds a full backward, so it is at least W (" +
                                   num(c.w) + ")");
  return Status::Ok();
}

Expected<SimResult> Simulate(const Schedule& schedule, const OpCosts& costs) {
  TROUPE_RETURN_IF_ERROR(ValidateCosts(costs));
  Producers producers;
  TROUPE_RETURN_IF_ERROR(CheckStatic(schedule, producers));
  // A split schedule runs the W part of a backward as its own op.
  const double w_apart = schedule.split_w ? costs.w : 0;
  auto cost = [&](const Op& op) {
    switch (op.kind) {
      case OpKind::kForward:
        return costs.f;
      case OpKind::kBackward:
        return costs.b - w_apart;
      case OpKind::kWeight:
        return costs.w;
      case OpKind::kForwardBackward:
        return costs.FB() - w_apart;
    }
    return 0.0;
  };
  SimResult result;
  result.costs = costs;
  TROUPE_RETURN_IF_ERROR(Replay(schedule, producers, cost, result.timing));
  result.busy.assign(schedule.ranks, 0);
  for (int r = 0; r < schedule.ranks; ++r) {
    for (const Op& op : schedule.per_rank[r]) result.busy[r] += cost(op);
    if (!result.timing[r].empty()) result.makespan = std::max(result.makespan, result.timing[r].back().end);
  }
  for (double busy : result.busy) result.bubble.push_back(result.makespan - busy);
  return result;
}

double FormulaBubble(ScheduleKind kind, int ranks, const OpCosts& c) {
  const double pp = StageCount(kind, ranks);
  switch (kind) {
    case ScheduleKind::k1F1B:
      return (pp - 1) * (c.f + c.b);
    case ScheduleKind::kZB1P:
      return (pp - 1) * (c.f + c.b - 2 * c.w);
    case ScheduleKind::kDualPipe:
    case ScheduleKind::kDualPipeV:
      return (pp / 2 - 1) * (c.FB() + c.b - 3 * c.w);
  }
  return 0;
}

}  // namespace troupe::parallel
