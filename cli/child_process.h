// Child processes of this binary: `troupe run` starts a cluster with them,
// `troupe train` with a [parallel] layout starts one process per rank.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::cli {

// fork + exec of this binary with `args` (args[0] is the program name);
// stderr, and stdout unless `inherit_stdout`, go to `log` (appended). The
// child gets an empty signal mask and SIGTERM when this process dies.
Expected<pid_t> Spawn(const std::vector<std::string>& args, const std::string& log, bool inherit_stdout);

// SIGTERM to every child still running (pid > 0), then SIGKILL to those not
// gone after `grace`; every pid is reaped and set to -1.
void StopChildren(std::vector<pid_t>& pids, std::chrono::seconds grace);

}  // namespace troupe::cli
