// troupe keys: CURVE key pairs, allow-list and HTTP token for a cluster.
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "coordinator/process_util.h"

namespace troupe::cli {

void AddKeysCommand(CLI::App& app, RunFn& run) {
  struct Flags {
    std::string out;
    int nodes = 3;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("keys", "make the keys of a cluster (coordinator, nodes, allow-list, HTTP token)");
  cmd->add_option("--out", f->out, "directory to write (created, mode 0700; files 0600)")->required();
  cmd->add_option("--nodes", f->nodes, "node key pairs node1..nodeN (default 3)")->check(CLI::Range(0, 1000));
  cmd->callback([f, &run] {
    run = [f] {
      Status st = cluster::WriteKeysDir(f->out, f->nodes);
      if (!st.ok()) return Fail(st);
      std::printf("keys: %s (coordinator.key, coordinator.pub, node1..node%d.key, allowed_clients, http.token)\n",
                  f->out.c_str(), f->nodes);
      return 0;
    };
  });
}

}  // namespace troupe::cli
