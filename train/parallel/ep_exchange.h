// ExpertExchange over a ProcessGroup: the all-to-alls of expert parallelism
// between the ranks of one stage and data replica (Layout::ExpertGroupOf),
// through the group's communication thread (CURVE ZeroMQ between
// processes).
#pragma once

#include <array>
#include <optional>
#include <vector>

#include "gpu/model/expert_exchange.h"
#include "train/parallel/process_group.h"

namespace troupe::parallel {

class GroupExpertExchange final : public ExpertExchange {
 public:
  // `members`: the group's world ranks by ep_rank; this process must be one.
  GroupExpertExchange(ProcessGroup& group, std::vector<int> members, int timeout_ms);
  int size() const override { return static_cast<int>(members_.size()); }
  int rank() const override { return my_index_; }
  Expected<std::vector<std::vector<uint8_t>>> AllToAll(std::vector<std::vector<uint8_t>> send, int phase) override;
  // Real halves: Start queues the sends on the group's send thread.
  Status Start(std::vector<std::vector<uint8_t>> send, int phase) override;
  Expected<std::vector<std::vector<uint8_t>>> Finish(int phase) override;
  // The members' two NCCL communicators, once they exist (rows then go
  // through them): one for the forward's phases, one for the backward's, so
  // an F&B pair's chunks never drive one communicator from two threads.
  void SetDevice(DeviceComm* forward, DeviceComm* backward) { device_ = {forward, backward}; }
  bool moves_rows_on_device() const override { return device_[0] != nullptr && device_[1] != nullptr; }
  Status ExchangeRows(const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
                      const std::vector<RowBlock>& recvs, int phase) override;

 private:
  ProcessGroup& group_;
  std::vector<int> members_;
  int my_index_ = 0;
  int timeout_ms_;
  std::array<DeviceComm*, 2> device_{};  // [0] phases 0-1 (forward), [1] phases 2-3 (backward)
  std::vector<int> comm_rank_;           // by ep_rank: the member's rank in the communicator (ascending world rank)
  std::array<std::optional<std::vector<uint8_t>>, kPhases> own_;  // this rank's rows between Start and Finish
};

}  // namespace troupe::parallel
