#include "train/parallel/ep_exchange.h"

#include <algorithm>

#include "train/parallel/collectives.h"
#include "train/parallel/tags.h"

namespace troupe::parallel {

GroupExpertExchange::GroupExpertExchange(ProcessGroup& group, std::vector<int> members, int timeout_ms)
    : group_(group), members_(std::move(members)), timeout_ms_(timeout_ms) {
  my_index_ = static_cast<int>(std::find(members_.begin(), members_.end(), group_.rank()) - members_.begin());
}

Expected<std::vector<std::vector<uint8_t>>> GroupExpertExchange::AllToAll(std::vector<std::vector<uint8_t>> send,
                                                                          int phase) {
  // Every member runs the same layers in the same order, so one tag per
  // phase keeps the transfers in step.
  const uint64_t tag = Tag(TagKind::kExperts, static_cast<uint64_t>(phase));
  return AllToAllV(group_, members_, std::move(send), tag, timeout_ms_);
}

}  // namespace troupe::parallel
