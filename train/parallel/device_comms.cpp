#include "train/parallel/device_comms.h"

#include <algorithm>

#include "train/parallel/tags.h"

namespace troupe::parallel {
namespace {

// Each group sorted, then the list sorted and without duplicates: the one
// global order every rank joins in (a group's position is its id's tag).
std::vector<std::vector<int>> Normalized(std::vector<std::vector<int>> groups) {
  for (auto& g : groups) std::sort(g.begin(), g.end());
  std::sort(groups.begin(), groups.end());
  groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
  return groups;
}

bool Joins(const std::vector<int>& sorted_group, int rank) {
  return sorted_group.size() > 1 && std::binary_search(sorted_group.begin(), sorted_group.end(), rank);
}

std::string Name(const std::vector<int>& members) {
  std::string s = "group of ranks ";
  for (size_t i = 0; i < members.size(); ++i) s += (i ? "," : "") + std::to_string(members[i]);
  return s;
}

}  // namespace

Expected<std::unique_ptr<DeviceComms>> DeviceComms::Connect(Backend& be, ProcessGroup& pg,
                                                            std::vector<std::vector<int>> groups, int timeout_ms) {
  const int me = pg.rank();
  groups = Normalized(std::move(groups));
  std::unique_ptr<DeviceComms> out(new DeviceComms());
  // First every id (ZeroMQ queues them all), then the joins in order.
  std::vector<std::pair<size_t, std::vector<uint8_t>>> ids;  // (group index, id) of the groups holding me
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const std::vector<int>& g = groups[gi];
    if (!Joins(g, me)) continue;
    const uint64_t tag = Tag(TagKind::kDeviceComm, gi);
    std::vector<uint8_t> id;
    if (g.front() == me) {
      TROUPE_ASSIGN_OR_RETURN(id, NewDeviceCommId(be));
      for (size_t i = 1; i < g.size(); ++i)
        TROUPE_RETURN_IF_ERROR(pg.Send(g[i], tag, id).WithContext("sending the NCCL id of the " + Name(g)));
    }
    ids.emplace_back(gi, std::move(id));
  }
  for (auto& [gi, id] : ids) {
    const std::vector<int>& g = groups[gi];
    if (id.empty()) {
      auto got = pg.Recv(g.front(), Tag(TagKind::kDeviceComm, gi), timeout_ms);
      if (!got.ok()) return got.status().WithContext("waiting for the NCCL id of the " + Name(g));
      id = std::move(got).value();
    }
    DeviceCommSpec spec;
    spec.id = std::move(id);
    spec.size = static_cast<int>(g.size());
    spec.rank = static_cast<int>(std::find(g.begin(), g.end(), me) - g.begin());
    spec.name = Name(g);
    TROUPE_ASSIGN_OR_RETURN(auto comm, CreateDeviceComm(be, spec, timeout_ms));
    out->comms_.emplace(g, std::move(comm));
  }
  return out;
}

std::unique_ptr<DeviceComms> DeviceComms::Of(std::map<std::vector<int>, std::unique_ptr<DeviceComm>> comms) {
  std::unique_ptr<DeviceComms> out(new DeviceComms());
  out->comms_ = std::move(comms);
  return out;
}

DeviceComm* DeviceComms::Find(const std::vector<int>& members) const {
  auto it = comms_.find(members);
  return it == comms_.end() ? nullptr : it->second.get();
}

Status DeviceComms::WaitAll(int timeout_ms) {
  for (auto& [members, comm] : comms_) {
    Status s = comm->Wait(timeout_ms);
    if (!s.ok()) {
      AbortAll(s.message());
      return s;
    }
  }
  return Status::Ok();
}

void DeviceComms::AbortAll(const std::string& why) {
  for (auto& [members, comm] : comms_) comm->Abort(why);
}

Expected<std::string> ChooseDeviceComm(const std::string& setting, const Backend& be, int world, int gpus) {
  const bool cuda = be.device() == DeviceKind::kCuda;
  if (setting == "host") return std::string("host");
  if (setting == "nccl") {
    if (!cuda)
      return Status::InvalidArgument(
          "parallel.device_comm = \"nccl\" needs the CUDA backend (--device cuda); this "
          "rank runs on " +
          be.Describe());
    return std::string("nccl");
  }
  if (setting == "auto") return std::string(cuda && world > 1 && world <= gpus ? "nccl" : "host");
  return Status::InvalidArgument("parallel.device_comm must be auto, nccl or host, not '" + setting + "'");
}

std::vector<std::vector<int>> GroupsOfRank(std::vector<std::vector<int>> groups, int rank) {
  std::vector<std::vector<int>> out;
  for (auto& g : Normalized(std::move(groups)))
    if (Joins(g, rank)) out.push_back(std::move(g));
  return out;
}

int GpuOfRank(int rank, int gpus) { return gpus > 0 ? rank % gpus : 0; }

}  // namespace troupe::parallel
