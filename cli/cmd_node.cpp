// troupe node: a cluster node (agent + one worker per GPU or CPU slot).
#include "actors/node/node.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "coordinator/process_util.h"

namespace troupe::cli {

void AddNodeCommand(CLI::App& app, RunFn& run) {
  auto o = std::make_shared<node::NodeOptions>();
  CLI::App* cmd = app.add_subcommand("node", "run a cluster node that joins a coordinator");
  cmd->add_option("--join", o->join, "coordinator endpoint tcp://HOST:PORT")->required();
  cmd->add_option("--keys", o->keys_dir, "keys directory (holds KEY-NAME.key and coordinator.pub)")->required();
  cmd->add_option("--key-name", o->key_name, "this node's key name, e.g. node1 (its identity)")->required();
  cmd->add_option("--cpu-slots", o->cpu_slots, "CPU workers (default 1 without GPUs, else 0)")
      ->check(CLI::Range(0, 256));
  cmd->add_option("--threads", o->cpu_threads, "threads per CPU worker (default: the job config's)")
      ->check(CLI::Range(0, 1024));
  cmd->add_flag("--gpus", o->use_gpus, "with --cpu-slots: also run one worker per GPU");
  cmd->add_option("--data", o->data_dir, "node data directory (optional)");
  cmd->add_option("--rank-host", o->rank_host,
                  "address the other nodes reach this one at, where a distributed job's ranks listen "
                  "(default 127.0.0.1: every node on this machine)");
  cmd->callback([o, &run] {
    run = [o] {
      auto wait = cluster::BlockStopSignals();
      Status st = node::RunNode(*o, wait);
      return st.ok() ? 0 : Fail(st);
    };
  });
}

}  // namespace troupe::cli
