// troupe: the one binary. main() only dispatches to a subcommand.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/train_dist.h"

int main(int argc, char** argv) {
  CLI::App app{"troupe: trains DeepSeek-V3-style mixture-of-experts models"};
  app.require_subcommand(1);
  troupe::cli::RunFn run;
  troupe::cli::AddDataCommand(app, run);
  troupe::cli::AddTrainCommand(app, run);
  troupe::cli::AddEvalCommand(app, run);
  troupe::cli::AddExportCommand(app, run);
  troupe::cli::AddKeysCommand(app, run);
  troupe::cli::AddCoordinatorCommand(app, run);
  troupe::cli::AddNodeCommand(app, run);
  troupe::cli::AddRunCommand(app, run);
  troupe::cli::AddCkptCommand(app, run);
  troupe::cli::AddScheduleCommand(app, run);
  troupe::cli::AddRankCommand(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help: usage on stdout, exit 0
    // Every other flag error: one line, like every other failure.
    std::string msg = e.what();
    if (argc >= 2 && argv[1][0] != '-' && app.get_subcommands().empty())
      msg = "unknown command '" + std::string(argv[1]) + "' (expected data, train, eval, export, keys, coordinator, node, run or schedule)";
    else if (argc < 2)
      msg = "a command is required (data, train, eval, export, keys, coordinator, node, run or schedule)";
    for (char& c : msg)
      if (c == '\n') c = ' ';
    std::fprintf(stderr, "troupe: error: %s; see --help\n", msg.c_str());
    return 2;
  }
  return run ? run() : 2;
}
