#include "coordinator/http_api.h"

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>
#include <sstream>

namespace troupe::cluster {
namespace {

using json = nlohmann::json;
using namespace protocol;

constexpr auto kActorTimeout = std::chrono::seconds(2);

void Reply(httplib::Response& res, int status, const std::string& body) {
  res.status = status;
  res.set_content(body, "application/json");
}

void Error(httplib::Response& res, int status, const std::string& msg) {
  Reply(res, status, json{{"error", msg}}.dump());
}

// Asks `dest` for its JSON view; an error string on timeout.
template <class Handle>
std::pair<bool, std::string> AskJson(caf::actor_system& sys, const Handle& dest) {
  caf::scoped_actor self{sys};
  std::pair<bool, std::string> out{false, "no answer"};
  self->request(dest, kActorTimeout, caf::get_atom_v)
      .receive([&](std::string& s) { out = {true, std::move(s)}; },
               [&](caf::error& e) { out = {false, "actor did not answer: " + sys.render(e)}; });
  return out;
}

// Pulls a number out of a JSON object (0 when absent or null).
double NumberAt(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : 0.0;
}

}  // namespace

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() != b.size();
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

HttpApi::HttpApi(caf::actor_system& system, membership_actor membership, job_actor job,
                 std::shared_ptr<CoordinatorCounters> counters, std::string bearer_token)
    : system_(system),
      membership_(std::move(membership)),
      job_(std::move(job)),
      counters_(std::move(counters)),
      token_(std::move(bearer_token)),
      server_(std::make_unique<httplib::Server>()) {}

HttpApi::~HttpApi() { Stop(); }

void HttpApi::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

Status HttpApi::Start(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos || colon == 0)
    return Status::InvalidArgument("--http must be HOST:PORT, not '" + host_port + "'");
  host_ = host_port.substr(0, colon);
  int port = -1;
  try {
    size_t used = 0;
    port = std::stoi(host_port.substr(colon + 1), &used);
    if (used != host_port.size() - colon - 1) port = -1;
  } catch (...) {
    port = -1;
  }
  if (port < 0 || port > 65535) return Status::InvalidArgument("--http: bad port in '" + host_port + "'");
  Routes();
  if (port == 0) {
    port_ = server_->bind_to_any_port(host_);
    if (port_ <= 0) return Status::IOError("HTTP: cannot bind " + host_ + " on any port");
  } else {
    if (!server_->bind_to_port(host_, port)) return Status::IOError("HTTP: cannot bind " + host_port);
    port_ = port;
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return Status::Ok();
}

void HttpApi::Routes() {
  httplib::Server& s = *server_;
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    Error(res, 500, "internal error");
  });
  s.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (res.body.empty()) Error(res, res.status, res.status == 404 ? "no such endpoint" : "bad request");
  });
  s.set_payload_max_length(1 << 20);
  s.set_read_timeout(5, 0);

  auto authorized = [this](const httplib::Request& req, httplib::Response& res) {
    const std::string got = req.get_header_value("Authorization");
    if (!ConstantTimeEquals(got, "Bearer " + token_)) {
      res.set_header("WWW-Authenticate", "Bearer");
      Error(res, 401, "missing or wrong bearer token");
      return false;
    }
    return true;
  };

  s.Get("/api/cluster", [this](const httplib::Request&, httplib::Response& res) {
    auto [ok, m] = AskJson(system_, membership_);
    if (!ok) return Error(res, 504, m);
    auto [jok, jb] = AskJson(system_, job_);
    json mj = json::parse(m);
    mj.erase("nodes");
    if (jok) {
      json j = json::parse(jb);
      mj["job"] = {{"state", j["state"]}, {"step", j["step"]}, {"total_steps", j["total_steps"]},
                   {"config_name", j["config_name"]}};
    }
    mj["refused_connections"] = counters_->refused_connections.load();
    Reply(res, 200, mj.dump());
  });
  s.Get("/api/nodes", [this](const httplib::Request&, httplib::Response& res) {
    auto [ok, m] = AskJson(system_, membership_);
    if (!ok) return Error(res, 504, m);
    json mj = json::parse(m);
    Reply(res, 200, json{{"epoch", mj["epoch"]}, {"nodes", mj["nodes"]}}.dump());
  });
  s.Get("/api/job", [this](const httplib::Request&, httplib::Response& res) {
    auto [ok, j] = AskJson(system_, job_);
    if (!ok) return Error(res, 504, j);
    Reply(res, 200, j);
  });
  s.Get("/api/checkpoints", [this](const httplib::Request&, httplib::Response& res) {
    caf::scoped_actor self{system_};
    self->request(job_, kActorTimeout, ckpt_atom_v)
        .receive([&](int status, std::string& body) { Reply(res, status, body); },
                 [&](caf::error& e) { Error(res, 504, "job actor did not answer: " + system_.render(e)); });
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    auto [ok, m] = AskJson(system_, membership_);
    auto [jok, jb] = AskJson(system_, job_);
    if (!ok || !jok) return Error(res, 504, ok ? jb : m);
    json mj = json::parse(m), jj = json::parse(jb);
    std::ostringstream o;
    o << "# HELP troupe_nodes Nodes by membership state.\n# TYPE troupe_nodes gauge\n";
    for (auto& [state, n] : mj["counts"].items()) o << "troupe_nodes{state=\"" << state << "\"} " << n << "\n";
    o << "# HELP troupe_membership_epoch Membership epoch (one per change).\n# TYPE troupe_membership_epoch gauge\n"
      << "troupe_membership_epoch " << mj["epoch"] << "\n";
    o << "# HELP troupe_uptime_seconds Seconds since this coordinator started.\n# TYPE troupe_uptime_seconds gauge\n"
      << "troupe_uptime_seconds " << NumberAt(mj, "uptime_s") << "\n";
    o << "# HELP troupe_job_state Job state (1 for the current one).\n# TYPE troupe_job_state gauge\n";
    for (const char* st : {"pending", "running", "interrupted", "completed", "stopped", "failed"})
      o << "troupe_job_state{state=\"" << st << "\"} " << (jj["state"] == st ? 1 : 0) << "\n";
    o << "# HELP troupe_job_step Last reported step of the current attempt.\n# TYPE troupe_job_step gauge\n"
      << "troupe_job_step " << jj["step"] << "\n";
    o << "# HELP troupe_job_attempt Attempts started so far.\n# TYPE troupe_job_attempt counter\n"
      << "troupe_job_attempt " << jj["attempt"] << "\n";
    o << "# HELP troupe_job_interruptions_total Attempts lost to dead or drained nodes.\n"
      << "# TYPE troupe_job_interruptions_total counter\ntroupe_job_interruptions_total " << jj["interruptions"]
      << "\n";
    o << "# HELP troupe_train_loss Training loss of the last step.\n# TYPE troupe_train_loss gauge\n"
      << "troupe_train_loss " << NumberAt(jj, "loss") << "\n";
    if (jj["val_loss"].is_number())
      o << "# HELP troupe_val_loss Latest validation loss.\n# TYPE troupe_val_loss gauge\ntroupe_val_loss "
        << NumberAt(jj, "val_loss") << "\n";
    o << "# HELP troupe_tokens_per_second Training throughput of the last step.\n"
      << "# TYPE troupe_tokens_per_second gauge\ntroupe_tokens_per_second " << NumberAt(jj, "tokens_per_s") << "\n";
    o << "# HELP troupe_refused_connections_total Connections refused by CURVE/ZAP (key not allowed).\n"
      << "# TYPE troupe_refused_connections_total counter\ntroupe_refused_connections_total "
      << counters_->refused_connections.load() << "\n";
    o << "# HELP troupe_malformed_frames_total Frames dropped by envelope checks.\n"
      << "# TYPE troupe_malformed_frames_total counter\ntroupe_malformed_frames_total "
      << counters_->malformed_frames.load() << "\n";
    o << "# HELP troupe_bad_messages_total Valid frames with undecodable or unexpected payloads.\n"
      << "# TYPE troupe_bad_messages_total counter\ntroupe_bad_messages_total " << counters_->bad_messages.load()
      << "\n";
    o << "# HELP troupe_frames_total Frames through the coordinator's transport.\n# TYPE troupe_frames_total counter\n"
      << "troupe_frames_total{direction=\"in\"} " << counters_->frames_in.load() << "\n"
      << "troupe_frames_total{direction=\"out\"} " << counters_->frames_out.load() << "\n";
    res.status = 200;
    res.set_content(o.str(), "text/plain; version=0.0.4");
  });
  s.Post(R"(/api/nodes/([^/]+)/drain)", [this, authorized](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    const std::string id = req.matches[1];
    caf::scoped_actor self{system_};
    self->request(membership_, kActorTimeout, drain_atom_v, id)
        .receive([&](int status, std::string& body) { Reply(res, status, body); },
                 [&](caf::error& e) { Error(res, 504, "membership actor did not answer: " + system_.render(e)); });
  });
  s.Post("/api/job/stop", [this, authorized](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    caf::scoped_actor self{system_};
    self->request(job_, kActorTimeout, stop_atom_v)
        .receive([&](int status, std::string& body) { Reply(res, status, body); },
                 [&](caf::error& e) { Error(res, 504, "job actor did not answer: " + system_.render(e)); });
  });
}

}  // namespace troupe::cluster
