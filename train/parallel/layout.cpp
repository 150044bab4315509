#include "train/parallel/layout.h"

#include <algorithm>
#include <limits>
#include <set>
#include <sstream>

namespace troupe::parallel {
namespace {

// Forward FLOPs per token of one layer; only ratios between layers matter.
double LayerCost(const ModelConfig& c, bool moe, int seq_len) {
  const double d = c.hidden_size, nh = c.num_attention_heads;
  const double dh = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  double attn = d * c.q_lora_rank + c.q_lora_rank * nh * (dh + dr) + d * (c.kv_lora_rank + dr) +
                c.kv_lora_rank * nh * (dh + dv) + nh * dv * d;
  attn += seq_len / 2.0 * nh * (dh + dr + dv);  // causal scores and weighted values
  const double ffn =
      moe ? 3.0 * d * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) + d * c.n_routed_experts
          : 3.0 * d * c.intermediate_size;
  return 2.0 * (attn + ffn);
}

// The output head, and the MTP modules (a layer, a projection and a head each).
double HeadCost(const ModelConfig& c, int seq_len) {
  const double head = 2.0 * c.hidden_size * c.vocab_size;
  const double mtp = LayerCost(c, c.num_hidden_layers > c.first_k_dense_replace, seq_len) +
                     2.0 * 2 * c.hidden_size * c.hidden_size + head;
  return head + c.num_nextn_predict_layers * mtp;
}

// Cuts layers [0, L) into `stages` non-empty runs minimising the largest
// stage cost (the last stage carries `tail` extra): dynamic programming over
// (stage, first layer), fine for the few hundred layers a model has.
std::vector<int> BalancedCuts(const std::vector<double>& cost, int stages, double tail) {
  const int n = static_cast<int>(cost.size());
  std::vector<double> prefix(n + 1, 0.0);
  for (int i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  const double inf = std::numeric_limits<double>::infinity();
  // best[s][i]: the smallest max-cost of cutting layers [i, n) into stages s .. stages-1.
  std::vector<std::vector<double>> best(stages + 1, std::vector<double>(n + 1, inf));
  std::vector<std::vector<int>> cut(stages + 1, std::vector<int>(n + 1, -1));
  best[stages][n] = 0.0;
  for (int s = stages - 1; s >= 0; --s) {
    for (int i = 0; i < n; ++i) {
      for (int j = i + 1; j <= n - (stages - 1 - s); ++j) {
        const double here = prefix[j] - prefix[i] + (s == stages - 1 ? tail : 0.0);
        if (s == stages - 1 && j != n) continue;
        const double worst = std::max(here, best[s + 1][j]);
        if (worst < best[s][i]) {
          best[s][i] = worst;
          cut[s][i] = j;
        }
      }
    }
  }
  std::vector<int> ends;
  for (int s = 0, i = 0; s < stages; ++s) {
    i = cut[s][i];
    ends.push_back(i);
  }
  return ends;
}

}  // namespace

RankCoord Layout::CoordOf(int rank) const {
  RankCoord c;
  c.pp_rank = rank % pp;
  c.ep_rank = (rank / pp) % ep;
  c.dp_rank = rank / (pp * ep);
  return c;
}

int Layout::RankOf(const RankCoord& c) const { return (c.dp_rank * ep + c.ep_rank) * pp + c.pp_rank; }

int Layout::ShardOf(int rank) const {
  const RankCoord c = CoordOf(rank);
  return c.dp_rank * ep + c.ep_rank;
}

std::vector<int> Layout::StagesOf(int pp_rank) const {
  switch (schedule) {
    case ScheduleKind::kDualPipe:
      return {pp_rank, pp - 1 - pp_rank};
    case ScheduleKind::kDualPipeV:
      return {pp_rank, 2 * pp - 1 - pp_rank};
    default:
      return {pp_rank};
  }
}

std::map<std::string, std::vector<int>> Layout::ParamHolders(const ModelConfig& cfg, int rank) const {
  std::vector<std::set<std::string>> held(stages.size());
  for (size_t s = 0; s < stages.size(); ++s) {
    for (std::string& n : ParamNames(cfg, ParamSelection::ForStage(cfg, stages[s]))) held[s].insert(std::move(n));
  }
  const int my_ep = CoordOf(rank).ep_rank;
  std::set<std::string> mine;
  for (int s : StagesOf(CoordOf(rank).pp_rank)) mine.insert(held[s].begin(), held[s].end());
  std::map<std::string, std::vector<int>> out;
  for (int r = 0; r < world(); ++r) {
    const bool same_experts = CoordOf(r).ep_rank == my_ep;
    std::set<std::string> here;
    for (int s : StagesOf(CoordOf(r).pp_rank)) here.insert(held[s].begin(), held[s].end());
    for (const std::string& n : here) {
      if (!mine.count(n)) continue;
      if (n.find(".mlp.experts.") != std::string::npos && !same_experts) continue;
      out[n].push_back(r);
    }
  }
  return out;
}

StageSpan Layout::SpanOf(int rank, int module) const {
  StageSpan span = stages[StagesOf(CoordOf(rank).pp_rank)[module]];
  span.ep = ep;
  span.ep_rank = CoordOf(rank).ep_rank;
  return span;
}

std::vector<int> Layout::ExpertGroupOf(int rank) const {
  RankCoord c = CoordOf(rank);
  std::vector<int> out;
  for (c.ep_rank = 0; c.ep_rank < ep; ++c.ep_rank) out.push_back(RankOf(c));
  return out;
}

std::string Layout::Explain() const {
  std::ostringstream o;
  o << "layout: pp=" << pp << " x ep=" << ep << " x dp=" << dp << " = " << world() << " ranks, schedule "
    << ScheduleKindName(schedule) << (split_w ? " (B/W split)" : "") << ", " << micro_batches << " micro-batches of "
    << micro_batch_size << " sequences per pipeline (" << global_batch << " sequences per step)\n";
  const double total = [&] {
    double t = 0;
    for (double c : stage_cost) t += c;
    return t;
  }();
  for (size_t s = 0; s < stages.size(); ++s) {
    const StageSpan& sp = stages[s];
    o << "  stage " << s << ": layers " << sp.first_layer << ".." << sp.end_layer - 1;
    if (sp.first) o << " + embedding";
    if (sp.last) o << " + head and MTP";
    o << " (" << static_cast<int>(100.0 * stage_cost[s] / total + 0.5) << "% of forward cost) on pp rank";
    std::vector<int> where;
    for (int r = 0; r < pp; ++r) {
      for (int held : StagesOf(r))
        if (held == static_cast<int>(s)) where.push_back(r);
    }
    for (size_t i = 0; i < where.size(); ++i) o << (i ? "," : "") << " " << where[i];
    o << "\n";
  }
  if (idle_workers > 0) o << "  " << idle_workers << " worker(s) left idle: the layout needs " << world() << "\n";
  if (ep > 1)
    o << "  routed experts: "
      << "split over " << ep << " ranks per stage\n";
  return o.str();
}

Expected<Layout> PlanLayout(const ModelConfig& model, const TrainConfig& train, const ParallelConfig& par,
                            int workers) {
  TROUPE_RETURN_IF_ERROR(ValidateParallelConfig(par));
  Layout l;
  l.pp = par.pp;
  l.ep = par.ep;
  l.dp = par.dp;
  TROUPE_ASSIGN_OR_RETURN(l.schedule, ParseScheduleKind(par.schedule));
  if (l.dp == 0) l.dp = workers / (l.pp * l.ep);  // as many replicas as fit
  if (l.dp == 0 || l.world() > workers)
    return Status::InvalidArgument("layout pp=" + std::to_string(l.pp) + " x ep=" + std::to_string(l.ep) +
                                   " x dp=" + std::to_string(std::max(l.dp, 1)) + " needs " +
                                   std::to_string(l.pp * l.ep * std::max(l.dp, 1)) + " workers; there are " +
                                   std::to_string(workers));
  l.idle_workers = workers - l.world();
  const int stages = StageCount(l.schedule, l.pp);
  if (model.num_hidden_layers < stages)
    return Status::InvalidArgument("schedule " + par.schedule + " with pp=" + std::to_string(l.pp) + " has " +
                                   std::to_string(stages) + " stages but the model has only " +
                                   std::to_string(model.num_hidden_layers) + " layers (one stage needs one layer)");
  if (l.pp == 1 && (l.schedule == ScheduleKind::kDualPipe || l.schedule == ScheduleKind::kDualPipeV))
    return Status::InvalidArgument("schedule " + par.schedule +
                                   " needs a pipeline (parallel.pp >= 2); with pp = 1 use 1f1b");
  if (l.pp == 1) {
    l.schedule = ScheduleKind::k1F1B;  // one stage: micro-batches run one after another, whatever the name
    l.micro_batches = par.micro_batches > 0 ? par.micro_batches : 1;
  } else {
    const bool dual = l.schedule == ScheduleKind::kDualPipe || l.schedule == ScheduleKind::kDualPipeV;
    l.micro_batches = par.micro_batches > 0 ? par.micro_batches : (dual ? 2 * l.pp : l.pp);
  }
  l.split_w = par.split_w && l.pp > 1 && l.schedule != ScheduleKind::k1F1B;
  // The schedule itself refuses what it cannot run (DualPipe: pp even, C >= 2 pp).
  if (l.pp > 1) {
    auto sched = BuildSchedule(l.schedule, l.pp, l.micro_batches, l.split_w);
    if (!sched.ok()) return sched.status();
  }
  if (l.ep > 1) {
    if (model.n_routed_experts % l.ep != 0)
      return Status::InvalidArgument(
          "parallel.ep = " + std::to_string(l.ep) +
          " does not divide model.n_routed_experts = " + std::to_string(model.n_routed_experts));
    if (model.n_group % l.ep != 0)
      return Status::InvalidArgument("parallel.ep = " + std::to_string(l.ep) +
                                     " does not divide model.n_group = " + std::to_string(model.n_group) +
                                     ": a routing group must live on one rank, or device-limited routing "
                                     "(topk_group) would not bound the ranks a token reaches");
  }
  const int per_step = l.shards() * l.micro_batches;
  if (train.batch_size % per_step != 0)
    return Status::InvalidArgument("train.batch_size = " + std::to_string(train.batch_size) + " does not split into " +
                                   std::to_string(l.shards()) + " data shards (ep x dp) x " +
                                   std::to_string(l.micro_batches) + " micro-batches");
  l.global_batch = train.batch_size;
  l.micro_batch_size = train.batch_size / per_step;
  std::vector<double> cost(model.num_hidden_layers);
  for (int i = 0; i < model.num_hidden_layers; ++i)
    cost[i] = LayerCost(model, i >= model.first_k_dense_replace, train.seq_len);
  const double tail = HeadCost(model, train.seq_len);
  const std::vector<int> ends = BalancedCuts(cost, stages, tail);
  for (int s = 0, begin = 0; s < stages; ++s) {
    StageSpan span{begin, ends[s], s == 0, s == stages - 1};
    double c = 0;
    for (int i = begin; i < ends[s]; ++i) c += cost[i];
    if (span.last) c += tail;
    l.stages.push_back(span);
    l.stage_cost.push_back(c);
    begin = ends[s];
  }
  return l;
}

}  // namespace troupe::parallel
