// STUB: troupe export
#include "cli/commands.h"

namespace troupe::cli {

void AddExportCommand(CLI::App& app, RunFn& run) {
  auto* cmd = app.add_subcommand("export", "not implemented yet");
  cmd->callback([&run] { run = [] { return 1; }; });
}

}  // namespace troupe::cli
