// STUB: troupe data
#include "cli/commands.h"

namespace troupe::cli {

void AddDataCommand(CLI::App& app, RunFn& run) {
  auto* cmd = app.add_subcommand("data", "not implemented yet");
  cmd->callback([&run] { run = [] { return 1; }; });
}

}  // namespace troupe::cli
