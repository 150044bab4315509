// Distributed jobs in the cluster (docs/cluster.md, "Distributed jobs"):
// which workers run the ranks of an attempt, and the coordinator's half of
// the rendezvous through which those ranks find each other. Plain code, no
// actors: the job actor owns one RankRendezvous and calls PlanRanks.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "actors/protocol/messages.h"
#include "common/status.h"
#include "configs/config.h"
#include "coordinator/job_record.h"

namespace troupe::cluster {

// Whether the job's [parallel] section asks for more than one rank
// (pp x ep x dp above one, or dp = 0: as many replicas as the workers allow).
bool IsDistributed(const ParallelConfig& p);

struct RankPlan {
  int dp = 1;
  std::vector<WorkerSlot> ranks;  // by world rank
  std::string explanation;        // the layout and the placement, for a person
};

// Plans an attempt over the live nodes' workers (node id -> worker count).
// parallel.dp = 0 takes the most replicas that fit and split the batch, so
// a job shrinks when nodes leave and grows back at its next attempt. Ranks
// go where train/parallel/placement.h puts them (an expert group on one
// node, a replica's stages on as few nodes as possible). Errors:
// InvalidArgument when no number of workers could run the layout (the job
// cannot run), NotFound when the live workers are too few for now.
Expected<RankPlan> PlanRanks(const JobConfig& job, const std::map<std::string, int32_t>& workers);

// The coordinator's half of one attempt's rendezvous: collects every rank's
// RankAddress for a round and, once all are in, the RankTable each rank is
// to get. Entries are checked against the attempt's placement: a node may
// speak only for the ranks it runs.
class RankRendezvous {
 public:
  // Forgets the previous attempt's entries.
  void Reset(uint64_t attempt, std::vector<WorkerSlot> ranks);

  // A rank's entry. When it completes its round, the tables to send, each
  // with the slot (node, worker) it goes to; otherwise none. Ranks repeat
  // their entry until their table comes: a repeat of a complete round gets
  // that rank's table again, one of an incomplete round nothing. InvalidArgument
  // (naming the problem) for another attempt, a round other than 0 or 1, a
  // rank out of range or not run by the sender's node, a malformed endpoint
  // or key, or a second entry of a rank that differs from its first.
  Expected<std::vector<std::pair<WorkerSlot, protocol::RankTable>>> Add(const protocol::RankAddress& a);

 private:
  struct Entry {
    bool set = false;
    std::string endpoint, public_key;
  };
  uint64_t attempt_ = 0;
  std::vector<WorkerSlot> ranks_;
  std::vector<Entry> rounds_[2];
};

}  // namespace troupe::cluster
