// The node process: an agent that joins the coordinator and one worker per
// GPU (CudaDeviceCount) or per configured CPU slot.
#pragma once

#include <functional>
#include <string>

#include "common/status.h"

namespace troupe::node {

struct NodeOptions {
  std::string join;       // tcp://HOST:PORT of the coordinator
  std::string keys_dir;   // holds <key_name>.key and coordinator.pub
  std::string key_name;   // e.g. "node1": this node's identity
  int cpu_slots = -1;     // CPU workers; -1: 1 when there is no GPU, else 0
  int cpu_threads = 0;    // threads per CPU worker (0: the job config's)
  bool use_gpus = false;  // with --cpu-slots given, also run one worker per GPU
  std::string data_dir;   // checkpoint shards go to <data_dir>/store; empty: this node keeps none
  std::string rank_host = "127.0.0.1";  // where a distributed job's ranks listen: an address other nodes reach
};

// Runs until `wait_for_stop(ms)` returns true (then leaves cleanly), the
// coordinator drains the node (OK), or refuses it (IOError naming why).
Status RunNode(const NodeOptions& options, const std::function<bool(int)>& wait_for_stop);

}  // namespace troupe::node
