// Each `troupe` subcommand lives in its own cli/cmd_*.cpp and registers itself
// here. A subcommand's callback returns the process exit code; it prints one
// clear error line on failure and never calls exit() itself.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace troupe::cli {

// Set by a subcommand's callback; main() returns it.
using RunFn = std::function<int()>;

void AddDataCommand(CLI::App& app, RunFn& run);
void AddTrainCommand(CLI::App& app, RunFn& run);
void AddEvalCommand(CLI::App& app, RunFn& run);
void AddExportCommand(CLI::App& app, RunFn& run);
void AddKeysCommand(CLI::App& app, RunFn& run);
void AddCoordinatorCommand(CLI::App& app, RunFn& run);
void AddNodeCommand(CLI::App& app, RunFn& run);
void AddRunCommand(CLI::App& app, RunFn& run);
void AddCkptCommand(CLI::App& app, RunFn& run);
void AddScheduleCommand(CLI::App& app, RunFn& run);

}  // namespace troupe::cli
