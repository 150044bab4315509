// The coordinator process: state store, actors, transport bridge, HTTP API.
#pragma once

#include <functional>
#include <string>

#include "common/status.h"

namespace troupe::cluster {

struct CoordinatorOptions {
  std::string keys_dir;                      // troupe keys --out DIR
  std::string data_dir;                      // RocksDB state lives in <data_dir>/state
  std::string listen = "tcp://127.0.0.1:5555";  // transport endpoint
  std::string http = "127.0.0.1:8080";       // HOST:PORT of the HTTP API
  std::string config;                        // job config (TOML); may be empty when the store has a job
  double heartbeat_timeout_s = 3.0;          // silence after which a node is dead
  double heartbeat_interval_s = 0.5;         // what nodes are told to use
  std::string shared_dir;                    // a folder every node reaches: distributed jobs' checkpoints
};

// Runs until `wait_for_stop(ms)` returns true (it waits up to ms for a
// stop request, e.g. SIGINT/SIGTERM). Errors: bad keys/config, damaged
// state store (Corruption), ports in use (IOError).
Status RunCoordinator(const CoordinatorOptions& options, const std::function<bool(int)>& wait_for_stop);

}  // namespace troupe::cluster
