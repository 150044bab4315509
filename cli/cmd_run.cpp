// troupe run: a whole cluster on this machine. Makes keys if missing,
// starts the coordinator and N nodes as child processes (fork/exec of this
// binary), streams the job's step lines, and stops every child cleanly on
// Ctrl-C / SIGTERM or when the job ends (SIGKILL after 5 s of waiting).
#include <fcntl.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/child_process.h"
#include "cli/cli_util.h"
#include "cli/commands.h"
#include "coordinator/process_util.h"

namespace troupe::cli {
namespace {

struct RunFlags {
  std::string config;
  int nodes = 3;
  std::string http = "127.0.0.1:8080";
  std::string listen = "tcp://127.0.0.1:5555";
  std::string dir = "runs/cluster";
  double heartbeat_timeout = 3.0;
  bool resume = false;
};

int RunCluster(const RunFlags& f) {
  auto wait_for_stop = cluster::BlockStopSignals();
  namespace fs = std::filesystem;
  if (!fs::exists(f.config)) return Fail(Status::NotFound("config " + f.config + " does not exist"));
  const std::string keys = f.dir + "/keys", data = f.dir + "/coordinator", logs = f.dir + "/logs",
                    shared = f.dir + "/shared";
  Status st = cluster::WriteKeysDir(keys, f.nodes);
  if (!st.ok()) return Fail(st);
  std::error_code ec;
  if (!f.resume) {
    fs::remove_all(data, ec);
    fs::remove_all(shared, ec);  // a distributed job's checkpoints belong to the state they were made with
  }
  fs::create_directories(logs, ec);
  if (ec) return Fail(Status::IOError("cannot create " + logs + ": " + ec.message()));
  const size_t colon = f.http.rfind(':');
  if (colon == std::string::npos) return Fail(Status::InvalidArgument("--http must be HOST:PORT"));

  std::vector<pid_t> pids;
  auto coord = Spawn({"troupe", "coordinator", "--keys", keys, "--data", data, "--listen", f.listen, "--http", f.http,
                      "--config", f.config, "--heartbeat-timeout", std::to_string(f.heartbeat_timeout),
                      "--shared-dir", shared},
                     logs + "/coordinator.log", /*inherit_stdout=*/true);
  if (!coord.ok()) return Fail(coord.status());
  pids.push_back(*coord);
  for (int i = 1; i <= f.nodes; ++i) {
    const std::string name = "node" + std::to_string(i);
    auto p = Spawn({"troupe", "node", "--join", f.listen, "--keys", keys, "--key-name", name, "--data",
                    f.dir + "/nodes/" + name},
                   logs + "/" + name + ".log", false);
    if (!p.ok()) {
      StopChildren(pids, std::chrono::seconds(5));
      return Fail(p.status());
    }
    pids.push_back(*p);
  }
  std::printf("troupe run: coordinator + %d nodes; HTTP API http://%s/api/cluster (also /api/nodes, /api/job, "
              "/metrics); logs in %s\n",
              f.nodes, f.http.c_str(), logs.c_str());
  std::fflush(stdout);

  httplib::Client http(f.http.substr(0, colon), std::stoi(f.http.substr(colon + 1)));
  http.set_connection_timeout(1, 0);
  http.set_read_timeout(2, 0);
  int code = 0;
  std::string end;
  auto last_poll = std::chrono::steady_clock::now();
  while (true) {
    if (wait_for_stop(200)) {
      end = "interrupted";
      break;
    }
    int status = 0;
    if (::waitpid(pids[0], &status, WNOHANG) == pids[0]) {
      pids[0] = -1;
      end = "the coordinator exited (see " + logs + "/coordinator.log)";
      code = 1;
      break;
    }
    if (std::chrono::steady_clock::now() - last_poll < std::chrono::seconds(1)) continue;
    last_poll = std::chrono::steady_clock::now();
    auto res = http.Get("/api/job");
    if (!res || res->status != 200) continue;
    auto j = nlohmann::json::parse(res->body, nullptr, false);
    if (j.is_discarded() || !j.contains("state")) continue;
    const std::string state = j["state"].get<std::string>();
    if (state == "completed" || state == "failed" || state == "stopped") {
      end = "job " + state;
      code = state == "completed" ? 0 : 1;
      break;
    }
  }
  std::printf("troupe run: %s; stopping the cluster\n", end.c_str());
  std::fflush(stdout);
  // Nodes first (they leave cleanly), then the coordinator.
  std::vector<pid_t> nodes(pids.begin() + 1, pids.end());
  StopChildren(nodes, std::chrono::seconds(5));
  std::vector<pid_t> coordinator{pids[0]};
  StopChildren(coordinator, std::chrono::seconds(5));
  return code;
}

}  // namespace

void AddRunCommand(CLI::App& app, RunFn& run) {
  auto f = std::make_shared<RunFlags>();
  CLI::App* cmd = app.add_subcommand("run", "run a local cluster (coordinator + N nodes) on a config");
  cmd->add_option("config", f->config, "job config (TOML)")->required();
  cmd->add_option("--nodes", f->nodes, "node processes (default 3)")->check(CLI::Range(1, 64));
  cmd->add_option("--http", f->http, "HTTP API HOST:PORT (default 127.0.0.1:8080)");
  cmd->add_option("--listen", f->listen, "transport endpoint (default tcp://127.0.0.1:5555)");
  cmd->add_option("--dir", f->dir, "keys, state and logs (default runs/cluster)");
  cmd->add_option("--heartbeat-timeout", f->heartbeat_timeout, "seconds (default 3)")->check(CLI::PositiveNumber);
  cmd->add_flag("--resume", f->resume, "keep the coordinator state of a previous run in --dir");
  cmd->callback([f, &run] { run = [f] { return RunCluster(*f); }; });
}

}  // namespace troupe::cli
