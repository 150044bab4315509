// Small helpers shared by the subcommands: one error line, backend choice,
// flag validators.
#pragma once

#include <CLI/CLI.hpp>

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

// The backend for `device` ("auto": the GPU when one is present; "cpu";
// "cuda"); `threads` applies to the CPU, `precision` to CUDA: "bf16"
// (tensor-core GEMMs on bf16-rounded inputs, fp32 storage and accumulation;
// what "auto" means on a GPU) or "fp32" (exact, for parity tests); `gpu`
// is the CUDA device index.
Expected<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int threads,
                                               const std::string& precision = "auto", int gpu = 0);

// Loads and validates a config file.
Expected<JobConfig> LoadJob(const std::string& path);

// "--flag N" must be a whole number >= `min` (CLI11's own checks print a
// floating-point range and accept nothing better for non-numbers).
CLI::Validator IntAtLeast(int min);

}  // namespace troupe::cli
