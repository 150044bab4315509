// The NCCL communicators of one rank: one per group of ranks that reduces a
// gradient bucket together (DualPipe's two copies of a stage, the data-
// parallel replicas, ...). The ids travel over the process group (CURVE
// ZeroMQ), so NCCL needs no rendezvous of its own.
//
// Joining is collective and blocking, so every rank joins its groups in one
// global order (the groups sorted): like locks taken in one order, no two
// ranks can wait on each other in a cycle.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gpu/device_comm.h"
#include "train/parallel/process_group.h"
#include "train/parallel/tags.h"

namespace troupe::parallel {

// One way of one pipeline edge: `from` sends `kind` (activations or
// gradients) to `to`. Each link is a communicator of its own, with its own
// stream, member 0 the sender: NCCL matches point-to-point calls by order
// only, and sends and receives queued on one stream in opposite orders by
// two ranks would wait on each other.
struct DeviceLink {
  int from = 0, to = 0;
  TagKind kind = TagKind::kActivation;
  auto operator<=>(const DeviceLink&) const = default;
};

// "activation link from rank 0 to rank 1", in errors.
std::string LinkName(const DeviceLink& link);

// The ranks of one collective communicator. `copy` 1 is a second one of the
// same members: NCCL matches a communicator's calls by order only, so work
// that two threads issue at once needs one each (an F&B pair's expert
// all-to-alls: forward on copy 0, backward on copy 1).
struct DeviceGroup {
  std::vector<int> members;
  int copy = 0;
  auto operator<=>(const DeviceGroup&) const = default;
};

class DeviceComms {
 public:
  // `groups`: the whole job's groups, the same list on every rank (any order;
  // duplicates and groups of one are ignored); `links` likewise (links to
  // oneself are ignored). Joins those holding this rank, the groups first.
  // Fails, naming the group, when a member does not come within timeout_ms
  // or NCCL refuses (two ranks on one GPU, say).
  static Expected<std::unique_ptr<DeviceComms>> Connect(Backend& be, ProcessGroup& pg, std::vector<DeviceGroup> groups,
                                                        std::vector<DeviceLink> links, int timeout_ms);
  // Communicators made elsewhere, by their members (ascending world ranks),
  // and links: for tests, which drive the device paths with CPU stand-ins.
  static std::unique_ptr<DeviceComms> Of(std::map<DeviceGroup, std::unique_ptr<DeviceComm>> comms,
                                         std::map<DeviceLink, std::unique_ptr<DeviceComm>> links = {});
  // The communicator of `members` (ascending world ranks), copy `copy`;
  // null for a group of one or one this rank is not in.
  DeviceComm* Find(const std::vector<int>& members, int copy = 0) const;
  // The communicator of `link`; null where this rank has none.
  DeviceComm* FindLink(const DeviceLink& link) const;
  size_t size() const { return comms_.size() + links_.size(); }
  size_t links() const { return links_.size(); }
  // Waits for everything queued on every communicator (see DeviceComm::Wait).
  // On the first failure every communicator is aborted: calls queued on the
  // others may wait on the failed member too, and the backend's stream on
  // them, which would hang the next device sync.
  Status WaitAll(int timeout_ms);
  // Fails every communicator's queued and later calls with `why`.
  void AbortAll(const std::string& why);

 private:
  std::map<DeviceGroup, std::unique_ptr<DeviceComm>> comms_;
  std::map<DeviceLink, std::unique_ptr<DeviceComm>> links_;
};

// Makes this rank's communicators for the job's `groups` (the list Connect
// takes). The default joins NCCL (Connect); tests hand DistributedTrainer a
// maker of CPU stand-ins to run the device paths without a GPU.
using DeviceCommsMaker = std::function<Expected<std::unique_ptr<DeviceComms>>(std::vector<DeviceGroup> groups,
                                                                              std::vector<DeviceLink> links)>;

// The groups `rank` joins, as Connect sees them: each sorted, duplicates and
// groups of one dropped, in one global order.
std::vector<DeviceGroup> GroupsOfRank(std::vector<DeviceGroup> groups, int rank);
// Likewise the links `rank` sends or receives on.
std::vector<DeviceLink> LinksOfRank(std::vector<DeviceLink> links, int rank);

// "nccl" / "host" for parallel.device_comm on this backend and layout, or why
// "nccl" cannot run. `auto` picks nccl on CUDA when each rank has its own GPU
// (world <= gpus): ranks sharing a GPU can reach each other only over NCCL's
// socket transport, slower than our host path.
Expected<std::string> ChooseDeviceComm(const std::string& setting, const Backend& be, int world, int gpus);

// The GPU rank `rank` of a local job uses: rank % gpus.
int GpuOfRank(int rank, int gpus);

}  // namespace troupe::parallel
