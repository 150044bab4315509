#include "train/parallel/device_comms.h"

#include <algorithm>

#include "train/parallel/tags.h"

namespace troupe::parallel {
namespace {

// Each group sorted, then the list sorted and without duplicates: the one
// global order every rank joins in (a group's position is its id's tag).
std::vector<DeviceGroup> Normalized(std::vector<DeviceGroup> groups) {
  for (auto& g : groups) std::sort(g.members.begin(), g.members.end());
  std::sort(groups.begin(), groups.end());
  groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
  return groups;
}

// Whether `rank` has a communicator with `members` (groups of one need none).
bool Joins(const std::vector<int>& members, int rank) {
  return members.size() > 1 && std::find(members.begin(), members.end(), rank) != members.end();
}

std::string Name(const DeviceGroup& g) {
  std::string s = "group of ranks ";
  for (size_t i = 0; i < g.members.size(); ++i) s += (i ? "," : "") + std::to_string(g.members[i]);
  return g.copy == 0 ? s : s + " (copy " + std::to_string(g.copy) + ")";
}

std::vector<DeviceLink> NormalizedLinks(std::vector<DeviceLink> links) {
  std::erase_if(links, [](const DeviceLink& l) { return l.from == l.to; });
  std::sort(links.begin(), links.end());
  links.erase(std::unique(links.begin(), links.end()), links.end());
  return links;
}

// One communicator to join: its members in communicator-rank order.
struct Joining {
  std::vector<int> members;
  std::string name;
  std::vector<uint8_t> id;
};

}  // namespace

Expected<std::unique_ptr<DeviceComms>> DeviceComms::Connect(Backend& be, ProcessGroup& pg,
                                                            std::vector<DeviceGroup> groups,
                                                            std::vector<DeviceLink> links, int timeout_ms) {
  const int me = pg.rank();
  groups = Normalized(std::move(groups));
  links = NormalizedLinks(std::move(links));
  // Groups, then links, in one list: a communicator's position is its id's tag.
  std::vector<Joining> all;
  for (const DeviceGroup& g : groups) all.push_back({g.members, Name(g), {}});
  for (const DeviceLink& l : links) all.push_back({{l.from, l.to}, LinkName(l), {}});
  std::unique_ptr<DeviceComms> out(new DeviceComms());
  // First every id (ZeroMQ queues them all), then the joins in order.
  std::vector<size_t> mine;
  for (size_t i = 0; i < all.size(); ++i) {
    Joining& j = all[i];
    if (!Joins(j.members, me)) continue;
    mine.push_back(i);
    if (j.members.front() != me) continue;
    TROUPE_ASSIGN_OR_RETURN(j.id, NewDeviceCommId(be));
    for (size_t m = 1; m < j.members.size(); ++m)
      TROUPE_RETURN_IF_ERROR(pg.Send(j.members[m], Tag(TagKind::kDeviceComm, i), j.id)
                                 .WithContext("sending the NCCL id of the " + j.name));
  }
  for (size_t i : mine) {
    Joining& j = all[i];
    if (j.id.empty()) {
      auto got = pg.Recv(j.members.front(), Tag(TagKind::kDeviceComm, i), timeout_ms);
      if (!got.ok()) return got.status().WithContext("waiting for the NCCL id of the " + j.name);
      j.id = std::move(got).value();
    }
    DeviceCommSpec spec;
    spec.id = std::move(j.id);
    spec.size = static_cast<int>(j.members.size());
    spec.rank = static_cast<int>(std::find(j.members.begin(), j.members.end(), me) - j.members.begin());
    spec.name = j.name;
    TROUPE_ASSIGN_OR_RETURN(auto comm, CreateDeviceComm(be, spec, timeout_ms));
    if (i < groups.size())
      out->comms_.emplace(groups[i], std::move(comm));
    else
      out->links_.emplace(links[i - groups.size()], std::move(comm));
  }
  // NCCL connects a pair at its first send and receive, and a non-blocking
  // communicator makes the caller wait for that: two ranks each sending first
  // on a different link would wait on each other. One small message per link,
  // in the global order, connects them all here (the link of least position
  // not yet connected has both members at it, so this always advances).
  TROUPE_ASSIGN_OR_RETURN(Tensor probe, be.Alloc({1}, DType::kF32, "link probe"));
  be.Zero(probe);
  for (auto& [link, comm] : out->links_) {
    Status s = link.from == me ? comm->Send(probe, 1) : comm->Receive(probe, 0);
    if (s.ok()) s = comm->Wait(timeout_ms);
    if (!s.ok()) return s.WithContext("connecting the " + LinkName(link));
  }
  return out;
}

std::unique_ptr<DeviceComms> DeviceComms::Of(std::map<DeviceGroup, std::unique_ptr<DeviceComm>> comms,
                                             std::map<DeviceLink, std::unique_ptr<DeviceComm>> links) {
  std::unique_ptr<DeviceComms> out(new DeviceComms());
  out->comms_ = std::move(comms);
  out->links_ = std::move(links);
  return out;
}

DeviceComm* DeviceComms::Find(const std::vector<int>& members, int copy) const {
  auto it = comms_.find(DeviceGroup{members, copy});
  return it == comms_.end() ? nullptr : it->second.get();
}

DeviceComm* DeviceComms::FindLink(const DeviceLink& link) const {
  auto it = links_.find(link);
  return it == links_.end() ? nullptr : it->second.get();
}

Status DeviceComms::WaitAll(int timeout_ms) {
  auto wait = [&](DeviceComm& comm) {
    Status s = comm.Wait(timeout_ms);
    if (!s.ok()) AbortAll(s.message());
    return s;
  };
  for (auto& [members, comm] : comms_) TROUPE_RETURN_IF_ERROR(wait(*comm));
  for (auto& [link, comm] : links_) TROUPE_RETURN_IF_ERROR(wait(*comm));
  return Status::Ok();
}

void DeviceComms::AbortAll(const std::string& why) {
  for (auto& [members, comm] : comms_) comm->Abort(why);
  for (auto& [link, comm] : links_) comm->Abort(why);
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

std::vector<DeviceGroup> GroupsOfRank(std::vector<DeviceGroup> groups, int rank) {
  std::vector<DeviceGroup> out;
  for (auto& g : Normalized(std::move(groups)))
    if (Joins(g.members, rank)) out.push_back(std::move(g));
  return out;
}

std::string LinkName(const DeviceLink& l) {
  return std::string(l.kind == TagKind::kGradient ? "gradient" : "activation") + " link from rank " +
         std::to_string(l.from) + " to rank " + std::to_string(l.to);
}

std::vector<DeviceLink> LinksOfRank(std::vector<DeviceLink> links, int rank) {
  std::vector<DeviceLink> out;
  for (const DeviceLink& l : NormalizedLinks(std::move(links)))
    if (l.from == rank || l.to == rank) out.push_back(l);
  return out;
}

int GpuOfRank(int rank, int gpus) { return gpus > 0 ? rank % gpus : 0; }

}  // namespace troupe::parallel
