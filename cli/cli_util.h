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

// The backend for `device` ("cpu" or "cuda"); `threads` applies to the CPU,
// `precision` ("fp32" or "bf16": bf16 tensor-core GEMMs, fp32 storage and
// accumulation) to CUDA.
Expected<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int threads,
                                               const std::string& precision = "fp32");

// Loads and validates a config file.
Expected<JobConfig> LoadJob(const std::string& path);

}  // namespace troupe::cli
