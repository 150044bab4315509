#include "coordinator/coordinator.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "actors/protocol/key_layout.h"
#include "configs/config.h"
#include "coordinator/actors.h"
#include "coordinator/http_api.h"

namespace troupe::cluster {
namespace {

Expected<std::string> ReadToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot read the HTTP token " + path + " (run troupe keys)");
  std::string tok;
  std::getline(in, tok);
  while (!tok.empty() && (tok.back() == '\r' || tok.back() == ' ')) tok.pop_back();
  if (tok.size() < 16) return Status::Corruption("HTTP token " + path + " is shorter than 16 characters");
  return tok;
}

// The job of a fresh data dir, from the config file.
Expected<JobRecord> NewJob(const std::string& config_path) {
  if (config_path.empty()) return Status::InvalidArgument("--config is required (the data dir holds no job yet)");
  TROUPE_ASSIGN_OR_RETURN(JobConfig job, LoadConfigFile(config_path));
  JobRecord r;
  r.config_path = config_path;
  r.config_name = std::filesystem::path(config_path).stem().string();
  r.toml_text = job.toml_text;
  r.total_steps = job.train.steps;
  return r;
}

}  // namespace

Status RunCoordinator(const CoordinatorOptions& o, const std::function<bool(int)>& wait_for_stop) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("coordinator"));
  spdlog::set_pattern("[%H:%M:%S.%e] [coordinator] [%l] %v");
  if (o.heartbeat_timeout_s <= 0 || o.heartbeat_interval_s <= 0 || o.heartbeat_interval_s >= o.heartbeat_timeout_s)
    return Status::InvalidArgument("--heartbeat-timeout must be positive and longer than the heartbeat interval");

  TROUPE_ASSIGN_OR_RETURN(transport::KeyPair keys, transport::ReadKeyPair(protocol::CoordinatorKeyPath(o.keys_dir)));
  TROUPE_ASSIGN_OR_RETURN(std::vector<std::string> allowed,
                          transport::ReadAllowList(protocol::AllowListPath(o.keys_dir)));
  TROUPE_ASSIGN_OR_RETURN(std::string token, ReadToken(protocol::HttpTokenPath(o.keys_dir)));

  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<StateStore> store_ptr, StateStore::Open(o.data_dir));
  std::shared_ptr<StateStore> store(std::move(store_ptr));
  if (!o.shared_dir.empty()) {
    // Refused here, once, rather than by every rank of every attempt.
    std::error_code ec;
    std::filesystem::create_directories(o.shared_dir, ec);
    if (ec || !std::filesystem::is_directory(o.shared_dir))
      return Status::IOError("cannot create --shared-dir " + o.shared_dir + ": " +
                             (ec ? ec.message() : std::string("not a directory")));
  }

  MembershipOptions mo;
  mo.failure_timeout = std::chrono::milliseconds(static_cast<int64_t>(o.heartbeat_timeout_s * 1000));
  mo.heartbeat_interval = std::chrono::milliseconds(static_cast<int64_t>(o.heartbeat_interval_s * 1000));
  TROUPE_ASSIGN_OR_RETURN(auto snap, store->LoadMembership());
  Membership membership(mo);
  if (snap) {
    membership = Membership::Restore(*snap, mo);
    spdlog::info("recovered membership from {}: epoch {}, {} nodes (live ones unconfirmed until they heartbeat)",
                 o.data_dir, membership.epoch(), snap->nodes.size());
  }
  TROUPE_ASSIGN_OR_RETURN(auto saved_job, store->LoadJob());
  JobRecord record;
  if (saved_job) {
    record = std::move(*saved_job);
    spdlog::info("recovered job '{}' from {}: {} at step {} (attempt {})", record.config_name, o.data_dir,
                 JobStateName(record.state), record.step, record.attempt);
    if (!o.config.empty() && std::filesystem::path(o.config).stem().string() != record.config_name)
      spdlog::warn("--config {} ignored: the data dir holds job '{}'", o.config, record.config_name);
  } else {
    TROUPE_ASSIGN_OR_RETURN(record, NewJob(o.config));
  }

  TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<transport::SecureServer> server_ptr,
                          transport::SecureServer::Bind(o.listen, keys, allowed));
  std::shared_ptr<transport::SecureServer> server(std::move(server_ptr));
  server->SetRefusalHandler([](const transport::Refusal& r) {
    spdlog::warn("refused a connection from {} (key {}): {}", r.address.empty() ? "?" : r.address,
                 r.public_key.empty() ? "none" : r.public_key, r.reason);
  });
  auto counters = std::make_shared<CoordinatorCounters>();
  const std::string endpoint = server->endpoint();

  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", size_t{2});
  caf::actor_system sys{cfg};
  // The checkpoint catalog: beside the state, <data>/catalog. A job whose
  // config cannot be parsed any more still runs its course without one.
  std::shared_ptr<CheckpointKeeper> checkpoints;
  if (auto cfg = ParseConfigText(record.toml_text, record.config_path); cfg.ok()) {
    auto k = CheckpointKeeper::Open(o.data_dir, cfg->checkpoint);
    if (!k.ok()) return k.status().WithContext("checkpoint catalog");
    checkpoints = std::move(k).value();
  } else {
    spdlog::error("checkpoints off: the job's config does not parse: {}", cfg.status().message());
  }
  auto job = sys.spawn(JobActor, std::move(record), store, checkpoints, o.shared_dir);
  auto mem = sys.spawn(MembershipActor, std::move(membership), store, job, server, counters);
  server.reset();  // the bridge owns it now

  HttpApi api(sys, mem, job, counters, token);
  Status st = api.Start(o.http);
  if (st.ok()) {
    std::printf("coordinator: transport %s, HTTP API http://%s:%d/api/cluster\n", endpoint.c_str(), api.host().c_str(),
                api.port());
    std::fflush(stdout);
    spdlog::info("listening on {} (CURVE, {} allowed keys); HTTP on {}:{}", endpoint, allowed.size(), api.host(),
                 api.port());
    while (!wait_for_stop(200)) {
    }
    spdlog::info("stopping");
  }
  api.Stop();
  caf::anon_send(mem, protocol::stop_atom_v);
  caf::anon_send_exit(job, caf::exit_reason::user_shutdown);
  sys.await_all_actors_done();
  return st;
}

}  // namespace troupe::cluster
