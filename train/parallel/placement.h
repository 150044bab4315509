// Which worker of which node runs each rank of a Layout (BRIEF §2).
//
// Traffic decides: an expert-parallel group exchanges every MoE layer's
// tokens twice per chunk (all-to-all), pipeline neighbours pass one
// activation per chunk, data-parallel replicas meet once per step. So the
// placer keeps each ep group on one node (a routing group is then one
// device, and a token's experts lie within one node's fabric), puts a
// replica's pipeline stages on as few nodes as it can, and spreads replicas
// last. A group that fits on no node is split, and the explanation says so.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "train/parallel/layout.h"

namespace troupe::parallel {

struct NodeWorkers {
  std::string node;  // the node's name (its key name in the cluster)
  int workers = 0;   // GPUs, or CPU slots
};

struct WorkerRef {
  std::string node;
  int worker = 0;  // index on that node
};

struct RankPlacement {
  std::vector<WorkerRef> rank_to_worker;  // [world rank]
  int split_expert_groups = 0;            // ep groups spread over more than one node
  std::string explanation;                // a few lines for a person
};

// Fails (naming the shortfall) when the nodes have fewer workers than the
// layout's ranks. Deterministic: the same inputs give the same placement.
Expected<RankPlacement> PlaceRanks(const Layout& layout, const std::vector<NodeWorkers>& nodes);

}  // namespace troupe::parallel
