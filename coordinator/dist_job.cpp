#include "coordinator/dist_job.h"

#include <algorithm>

#include "actors/transport/keys.h"
#include "train/parallel/layout.h"
#include "train/parallel/placement.h"

namespace troupe::cluster {

bool IsDistributed(const ParallelConfig& p) { return p.dp == 0 || p.pp * p.ep * p.dp > 1; }

namespace {

Expected<RankPlan> Place(const parallel::Layout& layout, const std::map<std::string, int32_t>& workers) {
  std::vector<parallel::NodeWorkers> nodes;
  for (const auto& [id, n] : workers)
    if (n > 0) nodes.push_back({id, n});
  TROUPE_ASSIGN_OR_RETURN(parallel::RankPlacement placed, parallel::PlaceRanks(layout, nodes));
  RankPlan plan;
  plan.dp = layout.dp;
  for (const parallel::WorkerRef& w : placed.rank_to_worker) plan.ranks.push_back({w.node, w.worker});
  plan.explanation = layout.Explain() + placed.explanation;
  return plan;
}

}  // namespace

Expected<RankPlan> PlanRanks(const JobConfig& job, const std::map<std::string, int32_t>& workers) {
  ParallelConfig par = job.parallel;
  const int per_replica = par.pp * par.ep;
  // Whether the layout can run at all: one replica (dp = 0) or the asked
  // number, on exactly the workers it needs.
  ParallelConfig smallest = par;
  if (smallest.dp == 0) smallest.dp = 1;
  auto possible = parallel::PlanLayout(job.model, job.train, smallest, per_replica * smallest.dp);
  if (!possible.ok()) return Status::InvalidArgument(possible.status().message());
  int64_t available = 0;
  for (const auto& [id, n] : workers) available += std::max(0, n);
  const auto too_few = [&](int need) {
    return Status::NotFound("the layout needs " + std::to_string(need) + " workers; the live nodes have " +
                            std::to_string(available));
  };
  if (par.dp > 0) {
    if (available < per_replica * par.dp) return too_few(per_replica * par.dp);
    return Place(*possible, workers);
  }
  // dp = 0: the most replicas that fit and split the global batch.
  // A replica needs a sequence of the global batch at least.
  const int most = static_cast<int>(std::min<int64_t>(available / per_replica, std::max(1, job.train.batch_size)));
  for (int dp = most; dp >= 1; --dp) {
    par.dp = dp;
    auto layout = parallel::PlanLayout(job.model, job.train, par, per_replica * dp);
    if (layout.ok()) return Place(*layout, workers);
  }
  return too_few(per_replica);
}

void RankRendezvous::Reset(uint64_t attempt, std::vector<WorkerSlot> ranks) {
  attempt_ = attempt;
  ranks_ = std::move(ranks);
  for (auto& round : rounds_) round.assign(ranks_.size(), Entry{});
}

namespace {

// tcp://HOST:PORT with a port in 1..65535 and nothing odd in HOST.
bool IsTcpEndpoint(const std::string& e) {
  if (e.size() > 270 || e.rfind("tcp://", 0) != 0) return false;
  const size_t colon = e.rfind(':');
  if (colon <= 6 || colon + 1 >= e.size()) return false;
  const std::string host = e.substr(6, colon - 6), port = e.substr(colon + 1);
  if (host.find_first_not_of("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-[]:") !=
      std::string::npos)
    return false;
  if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos) return false;
  const int p = std::stoi(port);
  return p >= 1 && p <= 65535;
}

}  // namespace

Expected<std::vector<std::pair<WorkerSlot, protocol::RankTable>>> RankRendezvous::Add(const protocol::RankAddress& a) {
  const std::string who =
      "rank " + std::to_string(a.rank) + " of attempt " + std::to_string(a.attempt) + " (from node " + a.node_id + ")";
  if (a.attempt != attempt_ || ranks_.empty())
    return Status::InvalidArgument(who + ": not the running attempt (" + std::to_string(attempt_) + ")");
  if (a.round < 0 || a.round > 1)
    return Status::InvalidArgument(who + ": round " + std::to_string(a.round) + " is not 0 or 1");
  if (a.rank < 0 || a.rank >= static_cast<int>(ranks_.size()))
    return Status::InvalidArgument(who + ": the attempt has " + std::to_string(ranks_.size()) + " ranks");
  if (ranks_[a.rank].node_id != a.node_id)
    return Status::InvalidArgument(who + ": that rank runs on node " + ranks_[a.rank].node_id);
  if (!IsTcpEndpoint(a.endpoint) || !transport::ValidateKey(a.public_key).ok())
    return Status::InvalidArgument(who + ": malformed address (endpoint '" + a.endpoint.substr(0, 64) + "', a key of " +
                                   std::to_string(a.public_key.size()) + " characters)");
  // An entry of round 1 stands for round 0 too: a coordinator that restarted
  // mid-rendezvous learns round 0 from ranks that are past it.
  for (int round = 0; round <= a.round; ++round) {
    const Entry& e = rounds_[round][a.rank];
    if (e.set && (e.endpoint != a.endpoint || e.public_key != a.public_key))
      return Status::InvalidArgument(who + ": a second, different entry for round " + std::to_string(round));
  }
  const bool repeat = rounds_[a.round][a.rank].set;
  for (int round = 0; round <= a.round; ++round) rounds_[round][a.rank] = Entry{true, a.endpoint, a.public_key};
  std::vector<std::pair<WorkerSlot, protocol::RankTable>> out;
  for (const Entry& x : rounds_[a.round])
    if (!x.set) return out;
  protocol::RankTable table;
  table.attempt = attempt_;
  table.round = a.round;
  if (a.round == 0)
    for (const Entry& x : rounds_[0]) {
      table.endpoints.push_back(x.endpoint);
      table.public_keys.push_back(x.public_key);
    }
  // A repeat after the round was complete: that rank's table was lost on
  // the way (a node reconnecting drops frames), so it alone gets it again.
  for (size_t r = 0; r < ranks_.size(); ++r) {
    if (repeat && static_cast<int>(r) != a.rank) continue;
    table.worker = ranks_[r].worker;
    out.emplace_back(ranks_[r], table);
  }
  return out;
}

}  // namespace troupe::cluster
