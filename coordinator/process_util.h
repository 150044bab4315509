// Process-level helpers of the cluster commands (troupe keys / coordinator /
// node / run): stop signals and the keys directory.
#pragma once

#include <functional>
#include <string>

#include "common/status.h"

namespace troupe::cluster {

// Blocks SIGINT and SIGTERM in the calling thread; call it in main() before
// any thread starts (threads inherit the mask, so only the waiter sees the
// signals). Returns wait_for_stop(ms): true once a stop signal arrived.
std::function<bool(int)> BlockStopSignals();

// Creates `dir` (0700) with the coordinator key pair, `nodes` node key
// pairs (node1..nodeN), the allow-list of every node*.key in the directory
// and an HTTP bearer token; every file 0600. Existing key files are kept
// (only missing ones are made), so it also adds nodes to an existing dir.
Status WriteKeysDir(const std::string& dir, int nodes);

}  // namespace troupe::cluster
