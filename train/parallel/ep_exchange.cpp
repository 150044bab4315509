#include "train/parallel/ep_exchange.h"

#include <algorithm>
#include <string>

#include "train/parallel/collectives.h"
#include "train/parallel/tags.h"

namespace troupe::parallel {

GroupExpertExchange::GroupExpertExchange(ProcessGroup& group, std::vector<int> members, int timeout_ms)
    : group_(group), members_(std::move(members)), timeout_ms_(timeout_ms) {
  my_index_ = static_cast<int>(std::find(members_.begin(), members_.end(), group_.rank()) - members_.begin());
  std::vector<int> sorted = members_;
  std::sort(sorted.begin(), sorted.end());
  for (int m : members_)
    comm_rank_.push_back(static_cast<int>(std::lower_bound(sorted.begin(), sorted.end(), m) - sorted.begin()));
}

namespace {

// Every member runs the same layers in the same order, so one tag per phase
// keeps the transfers in step.
uint64_t PhaseTag(int phase) { return Tag(TagKind::kExperts, static_cast<uint64_t>(phase)); }

}  // namespace

Expected<std::vector<std::vector<uint8_t>>> GroupExpertExchange::AllToAll(std::vector<std::vector<uint8_t>> send,
                                                                          int phase) {
  return AllToAllV(group_, members_, std::move(send), PhaseTag(phase), timeout_ms_);
}

Status GroupExpertExchange::Start(std::vector<std::vector<uint8_t>> send, int phase) {
  TROUPE_RETURN_IF_ERROR(CheckPhase(phase));
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> own, AllToAllVSend(group_, members_, std::move(send), PhaseTag(phase)));
  own_[phase] = std::move(own);
  return Status::Ok();
}

Expected<std::vector<std::vector<uint8_t>>> GroupExpertExchange::Finish(int phase) {
  if (!CheckPhase(phase).ok() || !own_[phase]) return NotStarted(phase);
  std::vector<uint8_t> own = std::move(*own_[phase]);
  own_[phase].reset();
  return AllToAllVRecv(group_, members_, std::move(own), PhaseTag(phase), timeout_ms_);
}

Status GroupExpertExchange::ExchangeRows(const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
                                         const std::vector<RowBlock>& recvs, int phase) {
  TROUPE_RETURN_IF_ERROR(CheckPhase(phase));
  DeviceComm* device = device_[phase < 2 ? 0 : 1];
  if (device == nullptr) return ExpertExchange::ExchangeRows(src, sends, dst, recvs, phase);
  // Blocks name peers by ep_rank; the communicator numbers its members in ascending world rank.
  auto to_comm = [&](std::vector<RowBlock> blocks) {
    for (RowBlock& b : blocks)
      b.peer = b.peer >= 0 && b.peer < size() ? comm_rank_[b.peer] : -1;  // -1: refused, with the block named
    return blocks;
  };
  TROUPE_RETURN_IF_ERROR(device->ExchangeRows(src, to_comm(sends), dst, to_comm(recvs)));
  // The host waits here, so a member that died is an error within the timeout rather than a hang in the next
  // kernel's sync; the layer's next step needs these rows anyway.
  return device->Wait(timeout_ms_);
}

}  // namespace troupe::parallel
