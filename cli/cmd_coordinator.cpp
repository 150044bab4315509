// troupe coordinator: the cluster's coordinator process.
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "coordinator/coordinator.h"
#include "coordinator/process_util.h"

namespace troupe::cli {

void AddCoordinatorCommand(CLI::App& app, RunFn& run) {
  auto o = std::make_shared<cluster::CoordinatorOptions>();
  CLI::App* cmd = app.add_subcommand("coordinator", "run the cluster coordinator (membership, job, HTTP API)");
  cmd->add_option("--keys", o->keys_dir, "keys directory (troupe keys --out)")->required();
  cmd->add_option("--data", o->data_dir, "data directory (durable state in DATA/state)")->required();
  cmd->add_option("--listen", o->listen, "transport endpoint (default tcp://127.0.0.1:5555)");
  cmd->add_option("--http", o->http, "HTTP API HOST:PORT (default 127.0.0.1:8080; port 0 = any)");
  cmd->add_option("--heartbeat-timeout", o->heartbeat_timeout_s, "seconds of silence before a node is dead (default 3)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--shared-dir", o->shared_dir,
                  "a folder every node can reach (local disk for one machine, else a shared file system): "
                  "distributed jobs write their checkpoints under it");
  cmd->add_option("--config", o->config, "job config (TOML); required unless the data dir holds a job");
  cmd->callback([o, &run] {
    run = [o] {
      auto wait = cluster::BlockStopSignals();
      Status st = cluster::RunCoordinator(*o, wait);
      return st.ok() ? 0 : Fail(st);
    };
  });
}

}  // namespace troupe::cli
