// STUB: troupe train
#include "cli/commands.h"

namespace troupe::cli {

void AddTrainCommand(CLI::App& app, RunFn& run) {
  auto* cmd = app.add_subcommand("train", "not implemented yet");
  cmd->callback([&run] { run = [] { return 1; }; });
}

}  // namespace troupe::cli
