#include "actors/node/node.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <filesystem>

#include "actors/node/node_actors.h"
#include "actors/protocol/key_layout.h"
#include "gpu/cuda/cuda_info.h"

namespace troupe::node {

Status RunNode(const NodeOptions& o, const std::function<bool(int)>& wait_for_stop) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("node"));
  spdlog::set_pattern("[%H:%M:%S.%e] [" + o.key_name + "] [%l] %v");
  if (o.join.rfind("tcp://", 0) != 0)
    return Status::InvalidArgument("--join must be tcp://HOST:PORT, not '" + o.join + "'");
  if (o.key_name.empty() || o.key_name.find('/') != std::string::npos)
    return Status::InvalidArgument("--key-name must be a plain name like node1");
  AgentConfig cfg;
  cfg.name = o.key_name;
  cfg.endpoint = o.join;
  cfg.cpu_threads = o.cpu_threads;
  cfg.data_dir = o.data_dir;
  // It becomes tcp://HOST:PORT in the rendezvous, where the coordinator refuses anything odd.
  if (o.rank_host.empty() || o.rank_host.size() > 253 ||
      o.rank_host.find_first_not_of("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-[]:") !=
          std::string::npos)
    return Status::InvalidArgument("--rank-host '" + o.rank_host.substr(0, 64) + "' is not a host name or IP address");
  cfg.rank_host = o.rank_host;
  TROUPE_ASSIGN_OR_RETURN(cfg.keys, transport::ReadKeyPair(protocol::NodeKeyPath(o.keys_dir, o.key_name)));
  TROUPE_ASSIGN_OR_RETURN(cfg.server_public_key,
                          transport::ReadPublicKey(protocol::CoordinatorPublicKeyPath(o.keys_dir)));
  int gpus = 0;
  if (o.cpu_slots < 0 || o.use_gpus) {  // dlopens the CUDA module only when GPUs may be used
    gpus = CudaDeviceCount();
    for (int g = 0; g < gpus; ++g)
      cfg.devices.push_back({"cuda", g, "GPU " + std::to_string(g) + " of " + CudaDeviceSummary(), 0});
  }
  const int cpu_slots = o.cpu_slots >= 0 ? o.cpu_slots : (gpus == 0 ? 1 : 0);
  for (int c = 0; c < cpu_slots; ++c) cfg.devices.push_back({"cpu", c, "cpu slot " + std::to_string(c), 0});
  if (cfg.devices.empty()) return Status::InvalidArgument("this node has no GPU and --cpu-slots 0: nothing to run");
  cfg.memory_bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (!o.data_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.data_dir, ec);
    if (ec) return Status::IOError("cannot create --data " + o.data_dir + ": " + ec.message());
  }

  auto outcome = std::make_shared<NodeOutcome>();
  caf::actor_system_config sys_cfg;
  sys_cfg.set("scheduler.max-threads", size_t{2});
  caf::actor_system sys{sys_cfg};
  auto agent = sys.spawn(Agent, cfg, outcome);
  spdlog::info("node '{}': {} workers, joining {}", o.key_name, cfg.devices.size(), o.join);
  bool signalled = false;
  while (!outcome->done) {
    if (wait_for_stop(200)) {
      signalled = true;
      break;
    }
  }
  if (signalled) caf::anon_send(agent, protocol::stop_atom_v);
  sys.await_all_actors_done();
  std::lock_guard<std::mutex> lock(outcome->mu);
  if (outcome->exit_code != 0) return Status::IOError(outcome->message);
  return Status::Ok();
}

}  // namespace troupe::node
