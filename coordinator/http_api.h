// The coordinator's HTTP JSON API (cpp-httplib on its own threads).
//
//   GET  /api/cluster               epoch, node counts, uptime, job summary
//   GET  /api/nodes                 id, name, host, state, devices, heartbeat age
//   GET  /api/job                   state, step, losses, val loss, tokens/s, history
//   GET  /api/checkpoints           committed checkpoints (id, step, bytes, replication, nodes, metrics)
//   GET  /metrics                   Prometheus text format
//   POST /api/nodes/{id}/drain      Authorization: Bearer <token> required
//   POST /api/job/stop              Authorization: Bearer <token> required
//
// Handlers talk to the actors with request/receive and a 2 s timeout (504
// when an actor does not answer). Errors are JSON {"error": "..."} with a
// 4xx/5xx status; nothing a client sends can crash the process.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "coordinator/actors.h"

namespace httplib {
class Server;
}

namespace troupe::cluster {

// Constant-time comparison (no early exit on the first differing byte).
bool ConstantTimeEquals(const std::string& a, const std::string& b);

class HttpApi {
 public:
  HttpApi(caf::actor_system& system, membership_actor membership, job_actor job,
          std::shared_ptr<CoordinatorCounters> counters, std::string bearer_token);
  ~HttpApi();

  // Binds "host:port" (port 0 = any free port) and starts serving.
  // InvalidArgument for a malformed address, IOError if the bind fails.
  Status Start(const std::string& host_port);
  int port() const { return port_; }
  std::string host() const { return host_; }
  // Stops serving and joins the thread. Idempotent.
  void Stop();

 private:
  void Routes();
  caf::actor_system& system_;
  membership_actor membership_;
  job_actor job_;
  std::shared_ptr<CoordinatorCounters> counters_;
  std::string token_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::string host_;
  int port_ = 0;
};

}  // namespace troupe::cluster
