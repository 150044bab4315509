// troupe: the one binary. main() only dispatches to a subcommand.
#include <cstdio>

#include "cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"troupe: trains DeepSeek-V3-style mixture-of-experts models"};
  app.require_subcommand(1);
  troupe::cli::RunFn run;
  troupe::cli::AddDataCommand(app, run);
  troupe::cli::AddTrainCommand(app, run);
  troupe::cli::AddEvalCommand(app, run);
  troupe::cli::AddExportCommand(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);  // prints usage or the flag error, returns its code
  }
  return run ? run() : 2;
}
