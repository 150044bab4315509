// Pipeline schedules (BRIEF §2): the order in which each pipeline rank runs
// the forward (F), input-gradient backward (B) and weight-gradient (W) chunks
// of every micro-batch, for 1F1B, ZB1P, DualPipe and DualPipeV.
//
// A Schedule is plain data the pipeline executor walks rank by rank.
// CheckSchedule proves a schedule complete, in dependency order and free of
// deadlock; Simulate prices it with per-chunk costs so its bubble can be set
// against the published formula (FormulaBubble). Nothing here talks to a
// network or a device; every function is pure and thread-safe.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::parallel {

enum class ScheduleKind {
  k1F1B,       // one forward, one backward; warm-up and cool-down bubbles
  kZB1P,       // 1F1B with W deferred into the cool-down (ZB-H1): same peak activations as 1F1B
  kDualPipe,   // V3's bidirectional pipeline; every rank holds two stages (parameters twice)
  kDualPipeV,  // DualPipe folded into a V over 2*ranks stages; no duplicated parameters
};

// "1f1b", "zb1p", "dualpipe", "dualpipev".
const char* ScheduleKindName(ScheduleKind kind);
Expected<ScheduleKind> ParseScheduleKind(const std::string& name);

enum class OpKind {
  kForward,          // F(f)
  kBackward,         // B(b): input gradients; the full backward when the schedule is not split_w
  kWeight,           // W(b): weight gradients of a B that ran earlier (split_w only)
  kForwardBackward,  // F(f) overlapped with B(b) of another micro-batch (DualPipe's F&B)
};
// "F", "B", "W", "FB".
const char* OpKindName(OpKind kind);

// A micro-batch at a pipeline stage.
struct ChunkRef {
  int micro = 0;
  int stage = 0;
  bool operator==(const ChunkRef&) const = default;
};

struct Op {
  OpKind kind = OpKind::kForward;
  ChunkRef f;  // used by kForward and kForwardBackward
  ChunkRef b;  // used by kBackward, kWeight and kForwardBackward
  bool operator==(const Op&) const = default;
};
// "F(m3,s1)", "FB(m3,s1|m0,s2)": the form every error message uses.
std::string OpToString(const Op& op);

// Where a chunk runs: the rank, and which of the rank's (at most two) stage
// copies ("modules") holds the stage.
struct Placement {
  int rank = 0;
  int module = 0;
  bool operator==(const Placement&) const = default;
};

struct Schedule {
  ScheduleKind kind = ScheduleKind::k1F1B;
  int ranks = 0;                          // pipeline ranks (devices)
  int stages = 0;                         // ranks, or 2*ranks for DualPipeV
  int micro_batches = 0;                  // C
  bool split_w = true;                    // B and W are separate ops; false: no W ops, B is the full backward
  std::vector<std::vector<Op>> per_rank;  // [rank] the ops in the order that rank runs them

  // Where stage `c.stage` of micro-batch `c.micro` runs. 1F1B/ZB1P: stage s on
  // rank s. DualPipe: rank r holds stage r (module 0) and stage ranks-1-r
  // (module 1); micro-batches [0, C/2) enter at rank 0 and use stage s on rank
  // s, micro-batches [C/2, C) enter at rank ranks-1 and use the copy on rank
  // ranks-1-s. DualPipeV: rank r holds stages r (module 0) and 2*ranks-1-r
  // (module 1). Precondition: c is in range.
  Placement Place(ChunkRef c) const;
};

// One rank's ops on one line, e.g. "F0 F1 B4' W4' F3+B5'": kind and
// micro-batch; ' marks the rank's second stage copy (module 1), + joins an F&B
// pair. Precondition: 0 <= rank < ranks and every chunk in range.
std::string RankOpsToString(const Schedule& schedule, int rank);

// Stages of a pipeline of `ranks` ranks: 2*ranks for DualPipeV, else ranks.
int StageCount(ScheduleKind kind, int ranks);

// The schedule of `kind` for `micro_batches` micro-batches on `ranks` ranks.
// DualPipe and DualPipeV follow the eight steps of the public DualPipe step()
// (BRIEF §2), F&B pairs included; ZB1P is ZB-H1. With split_w=false every W
// is folded into its B. Fails (InvalidArgument, naming the rule) where the
// kind cannot run: ranks < 1, micro_batches < 1; DualPipe needs ranks even and
// micro_batches even and >= 2*ranks; DualPipeV needs micro_batches >= 2*ranks.
Expected<Schedule> BuildSchedule(ScheduleKind kind, int ranks, int micro_batches, bool split_w);

// OK when every rank runs exactly the ops placed on it (one F and one B per
// chunk, one W per chunk when split_w, none otherwise), each after the ops it
// depends on, and all ranks can run to the end without deadlock: ops run in
// rank order and start only once their inputs exist (receives block, sends
// do not). Dependencies: F(m,s) needs F(m,s-1); B(m,s) needs F(m,s) and
// B(m,s+1); W(m,s) needs B(m,s). Otherwise InvalidArgument naming the rank,
// the op and the missing or misplaced dependency (for a deadlock: where each
// stuck rank waits).
Status CheckSchedule(const Schedule& schedule);

// Chunk costs, in any time unit (the bubble table's notation).
struct OpCosts {
  double f = 1;    // a forward chunk
  double b = 2;    // a full backward chunk (input and weight gradients); a split B op costs b - w
  double w = 1;    // the weight-gradient part of b
  double fb = -1;  // an overlapped pair, F plus the full backward of another micro-batch (the table's
                   // F&B); negative: f + b, no overlap gain. A split FB op (its W runs apart) costs fb - w,
                   // which is F + B_input by default.
  double FB() const { return fb < 0 ? f + b : fb; }
};
// InvalidArgument unless every cost is >= 0, w <= b and w <= FB().
Status ValidateCosts(const OpCosts& costs);

struct OpTiming {
  double start = 0;
  double end = 0;
};

struct SimResult {
  OpCosts costs;                              // what the ops were priced at
  double makespan = 0;                        // when the last rank finishes
  std::vector<double> busy;                   // [rank] time spent computing
  std::vector<double> bubble;                 // [rank] makespan - busy
  std::vector<std::vector<OpTiming>> timing;  // [rank][op], parallel to Schedule::per_rank
};

// Runs the schedule on an ideal machine: each rank runs its ops in order, an op
// starts when its rank is free and its inputs exist, transfers take no time.
// Fails when CheckSchedule or ValidateCosts does.
Expected<SimResult> Simulate(const Schedule& schedule, const OpCosts& costs);

// The bubble the table in BRIEF §2 predicts: 1F1B (PP-1)(F+B); ZB1P
// (PP-1)(F+B-2W); DualPipe (PP/2-1)(F&B+B-3W) with PP = ranks; DualPipeV the
// same with PP = 2*ranks stages.
double FormulaBubble(ScheduleKind kind, int ranks, const OpCosts& costs);

// {format, version, kind, ranks, stages, micro_batches, split_w, placement
// [micro][stage] = [rank, module], per_rank [rank][i] = {op: "F"|"B"|"W",
// micro, stage} or {op: "FB", f_micro, f_stage, b_micro, b_stage}}, plus
// {simulation: {costs, makespan, busy, bubble, timing [rank][i] = [start,
// end]}} when `sim` (Simulate's result for this schedule) is given.
nlohmann::json ScheduleToJson(const Schedule& schedule, const SimResult* sim = nullptr);
// The schedule part of ScheduleToJson's output (placement and simulation are
// derived, so ignored). Runs no CheckSchedule: a file may hold a broken one.
Expected<Schedule> ScheduleFromJson(const nlohmann::json& j);

}  // namespace troupe::parallel
