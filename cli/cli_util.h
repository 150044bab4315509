// Small helpers shared by the subcommands: one error line, backend choice.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "common/status.h"
#include "configs/config.h"
#include "gpu/backend.h"

namespace troupe::cli {

// Prints "troupe: error: <message>" to stderr; returns the exit code to use
// (2 for bad input, 1 for everything else).
int Fail(const Status& status);

// The backend for `device` ("cpu" or "cuda"); threads applies to the CPU.
Expected<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int threads);

// Loads and validates a config file, then applies command-line overrides
// (a value < 0 or an empty string means "keep the file's").
Expected<JobConfig> LoadJob(const std::string& path);

}  // namespace troupe::cli
