// STUB: troupe eval
#include "cli/commands.h"

namespace troupe::cli {

void AddEvalCommand(CLI::App& app, RunFn& run) {
  auto* cmd = app.add_subcommand("eval", "not implemented yet");
  cmd->callback([&run] { run = [] { return 1; }; });
}

}  // namespace troupe::cli
