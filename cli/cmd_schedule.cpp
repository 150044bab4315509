// troupe schedule: build a pipeline schedule (BRIEF §2), check it and price it
// on an ideal machine, next to the bubble the published table predicts.
//
//   troupe schedule --kind 1f1b|zb1p|dualpipe|dualpipev --pp RANKS --micro C
//                   [--no-split-w] [--json FILE] [--f 1 --b 2 --w 1 --fb F&B]
#include <cstdio>
#include <fstream>
#include <string>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "train/parallel/schedule.h"

namespace troupe::cli {
namespace {

struct ScheduleFlags {
  std::string kind;
  int pp = 0;
  int micro = 0;
  bool no_split_w = false;
  std::string json;
  parallel::OpCosts costs;
};

// "0,7": the stages rank `r` holds, module 0 first.
std::string StagesOf(const parallel::Schedule& s, int r) {
  int stage[2] = {-1, -1};
  for (int m : {0, s.micro_batches - 1})
    for (int st = 0; st < s.stages; ++st) {
      const parallel::Placement p = s.Place({m, st});
      if (p.rank == r) stage[p.module] = st;
    }
  return std::to_string(stage[0]) + (stage[1] >= 0 ? "," + std::to_string(stage[1]) : "");
}

Status WriteJson(const std::string& path, const nlohmann::json& j) {
  std::ofstream out(path);
  if (!out) return Status::IOError("cannot write " + path);
  out << j.dump(1) << "\n";
  out.close();
  if (!out) return Status::IOError("writing " + path + " failed");
  return Status::Ok();
}

// A cost flag: a number >= 0 (CLI11's NonNegativeNumber prints the range as a 300-digit number).
CLI::Validator CostAtLeastZero() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v) || !(v >= 0)) return "must be a number >= 0, not '" + s + "'";
        return {};
      },
      "COST>=0");
}

int RunSchedule(const ScheduleFlags& f) {
  using namespace troupe::parallel;
  auto kind = ParseScheduleKind(f.kind);
  if (!kind.ok()) return Fail(kind.status());
  Status costs_ok = ValidateCosts(f.costs);
  if (!costs_ok.ok()) return Fail(costs_ok);
  auto built = BuildSchedule(*kind, f.pp, f.micro, !f.no_split_w);
  if (!built.ok()) {
    std::fprintf(stderr, "troupe: error: %s\n", built.status().message().c_str());
    return 1;  // the flags parsed; this schedule cannot exist
  }
  const Schedule& s = *built;
  const OpCosts& c = f.costs;
  std::printf("%s: %d ranks, %d stages, %d micro-batches, %s; F %g, B %g, W %g, F&B %g\n", ScheduleKindName(s.kind),
              s.ranks, s.stages, s.micro_batches, s.split_w ? "B and W apart" : "W inside B", c.f, c.b, c.w, c.FB());
  std::printf("ops: F/B/W and micro-batch; ' = the rank's second stage; F3+B1 = an overlapped F&B pair\n");
  for (int r = 0; r < s.ranks; ++r)
    std::printf("rank %d [stage %s]: %s\n", r, StagesOf(s, r).c_str(), RankOpsToString(s, r).c_str());

  Status check = CheckSchedule(s);
  if (!check.ok()) {
    std::fprintf(stderr, "troupe: error: check failed: %s\n", check.message().c_str());
    return 1;
  }
  std::printf("check: ok (each chunk's %s once, on its rank, in dependency order; no deadlock)\n",
              s.split_w ? "F, B and W" : "F and B");
  auto sim = Simulate(s, c);
  if (!sim.ok()) return Fail(sim.status());
  const double formula = FormulaBubble(s.kind, s.ranks, c);
  std::printf("simulated (ideal machine, free transfers): makespan %g%s\n", sim->makespan,
              s.split_w ? "" : "; the formula assumes W apart from B, to be deferred");
  std::printf("%6s %10s %10s %10s\n", "rank", "busy", "bubble", "formula");
  for (int r = 0; r < s.ranks; ++r) std::printf("%6d %10g %10g %10g\n", r, sim->busy[r], sim->bubble[r], formula);

  if (!f.json.empty()) {
    Status st = WriteJson(f.json, ScheduleToJson(s, &*sim));
    if (!st.ok()) return Fail(st);
    std::printf("wrote %s\n", f.json.c_str());
  }
  return 0;
}

}  // namespace

void AddScheduleCommand(CLI::App& app, RunFn& run) {
  auto flags = std::make_shared<ScheduleFlags>();
  CLI::App* cmd = app.add_subcommand("schedule", "build, check and simulate a pipeline schedule");
  cmd->add_option("--kind", flags->kind, "1f1b | zb1p | dualpipe | dualpipev")
      ->required()
      ->check(CLI::IsMember({"1f1b", "zb1p", "dualpipe", "dualpipev"}));
  cmd->add_option("--pp", flags->pp, "pipeline ranks")->required()->check(IntAtLeast(1));
  cmd->add_option("--micro", flags->micro, "micro-batches per step")->required()->check(IntAtLeast(1));
  cmd->add_flag("--no-split-w", flags->no_split_w, "run each weight gradient inside its B (no W ops)");
  cmd->add_option("--json", flags->json, "also write the schedule and its simulated timeline to FILE");
  cmd->add_option("--f", flags->costs.f, "cost of a forward chunk (default 1)")->check(CostAtLeastZero());
  cmd->add_option("--b", flags->costs.b, "cost of a full backward chunk (default 2)")->check(CostAtLeastZero());
  cmd->add_option("--w", flags->costs.w, "the weight-gradient part of --b (default 1)")->check(CostAtLeastZero());
  cmd->add_option("--fb", flags->costs.fb, "an overlapped F and full-B pair (default F + B: no overlap gain)")
      ->check(CostAtLeastZero());
  cmd->callback([flags, &run] { run = [flags] { return RunSchedule(*flags); }; });
}

}  // namespace troupe::cli
