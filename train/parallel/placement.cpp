#include "train/parallel/placement.h"

#include <algorithm>
#include <sstream>

namespace troupe::parallel {

Expected<RankPlacement> PlaceRanks(const Layout& layout, const std::vector<NodeWorkers>& nodes) {
  int total = 0;
  for (const NodeWorkers& n : nodes) total += std::max(0, n.workers);
  if (total < layout.world())
    return Status::InvalidArgument("the layout needs " + std::to_string(layout.world()) + " workers; the " +
                                   std::to_string(nodes.size()) + " node(s) have " + std::to_string(total));
  std::vector<int> used(nodes.size(), 0);
  RankPlacement out;
  out.rank_to_worker.resize(layout.world());
  std::ostringstream why;
  auto free_on = [&](size_t n) { return nodes[n].workers - used[n]; };
  for (int dp = 0; dp < layout.dp; ++dp) {
    int previous = -1;  // the node of this replica's previous stage
    for (int pp = 0; pp < layout.pp; ++pp) {
      // The ep group of (pp, dp): stay on the previous stage's node if it
      // has room, else the node with the most room (ties: the first).
      int pick = -1;
      if (previous >= 0 && free_on(previous) >= layout.ep) pick = previous;
      for (size_t n = 0; pick < 0 && n < nodes.size(); ++n) {
        if (free_on(n) < layout.ep) continue;
        if (pick < 0 || free_on(n) > free_on(pick)) pick = static_cast<int>(n);
      }
      std::vector<int> group_nodes;
      for (int e = 0; e < layout.ep; ++e) {
        int node = pick;
        if (node < 0 || free_on(node) == 0) {  // no node holds the whole group: fill the roomiest
          node = -1;
          for (size_t n = 0; n < nodes.size(); ++n)
            if (free_on(n) > 0 && (node < 0 || free_on(n) > free_on(node))) node = static_cast<int>(n);
        }
        const int rank = layout.RankOf({pp, e, dp});
        out.rank_to_worker[rank] = {nodes[node].node, used[node]++};
        if (std::find(group_nodes.begin(), group_nodes.end(), node) == group_nodes.end()) group_nodes.push_back(node);
      }
      if (group_nodes.size() > 1) {
        ++out.split_expert_groups;
        why << "  expert group of stage rank " << pp << ", replica " << dp << " spans " << group_nodes.size()
            << " nodes: its all-to-all crosses the network\n";
      }
      previous = group_nodes.front();
    }
  }
  std::ostringstream o;
  o << "placement of " << layout.world() << " ranks on " << nodes.size() << " node(s):\n";
  for (int r = 0; r < layout.world(); ++r) {
    const RankCoord c = layout.CoordOf(r);
    o << "  rank " << r << " (pp " << c.pp_rank << ", ep " << c.ep_rank << ", dp " << c.dp_rank
      << "): " << out.rank_to_worker[r].node << " worker " << out.rank_to_worker[r].worker << "\n";
  }
  out.explanation = o.str() + why.str();
  return out;
}

}  // namespace troupe::parallel
