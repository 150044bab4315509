// The cluster with real processes on loopback: a coordinator and nodes,
// each a fork/exec of the troupe binary (TROUPE_BINARY), on free ports.
// Every wait is bounded; TearDown SIGKILLs whatever is still running.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "actors/protocol/key_layout.h"
#include "actors/protocol/messages.h"
#include "actors/transport/codec.h"
#include "actors/transport/socket.h"
#include "data/shards.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

int FreePort() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  ::close(s);
  return port;
}

// Polls `pred` every 50 ms until it holds or `timeout` passes.
bool WaitFor(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return pred();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("troupe_cluster_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "logs");
    keys_ = (dir_ / "keys").string();
    ASSERT_EQ(RunToEnd({"keys", "--out", keys_, "--nodes", "3"}), 0);
    port_ = FreePort();
    http_port_ = FreePort();
    endpoint_ = "tcp://127.0.0.1:" + std::to_string(port_);
    std::ifstream tok(keys_ + "/http.token");
    std::getline(tok, token_);
  }

  void TearDown() override {
    for (auto& [name, pid] : procs_) {
      if (pid > 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    }
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // Small random shards and a tiny model: thousands of steps per second.
  std::string WriteConfig(int steps, const std::string& extra = "") {
    std::mt19937 rng(7);
    std::vector<int> train(20000), val(4000);
    for (int& t : train) t = rng() % 64;
    for (int& t : val) t = rng() % 64;
    const std::string tr = (dir_ / "train.bin").string(), va = (dir_ / "val.bin").string();
    EXPECT_TRUE(troupe::data::WriteShard(tr, train).ok());
    EXPECT_TRUE(troupe::data::WriteShard(va, val).ok());
    const std::string path = (dir_ / "micro.toml").string();
    std::ofstream out(path);
    out << "[model]\nvocab_size = 64\nhidden_size = 32\nnum_hidden_layers = 2\nfirst_k_dense_replace = 1\n"
           "num_attention_heads = 2\nq_lora_rank = 16\nkv_lora_rank = 16\nqk_nope_head_dim = 8\n"
           "qk_rope_head_dim = 4\nv_head_dim = 8\nintermediate_size = 64\nmoe_intermediate_size = 16\n"
           "n_routed_experts = 4\nn_shared_experts = 1\nnum_experts_per_tok = 2\nn_group = 2\ntopk_group = 1\n"
           "num_nextn_predict_layers = 0\n"
        << "[train]\nseq_len = 16\nbatch_size = 4\nsteps = " << steps
        << "\nwarmup_steps = 2\neval_every = 50\neval_batches = 2\nlog_every = 50\nthreads = 1\ndevice = \"cpu\"\n"
        << "[data]\ntrain_shards = [\"" << tr << "\"]\nval_shards = [\"" << va << "\"]\ntokenizer = \"\"\n"
        << extra;
    return path;
  }

  pid_t Start(const std::string& name, std::vector<std::string> args) {
    const std::string log = (dir_ / "logs" / (name + ".log")).string();
    const pid_t pid = ::fork();
    if (pid == 0) {
      FILE* f = std::fopen(log.c_str(), "a");
      ::dup2(fileno(f), STDOUT_FILENO);
      ::dup2(fileno(f), STDERR_FILENO);
      args.insert(args.begin(), TROUPE_BINARY);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(TROUPE_BINARY, argv.data());
      _exit(127);
    }
    procs_[name] = pid;
    return pid;
  }

  int RunToEnd(std::vector<std::string> args) {
    const pid_t pid = Start("cmd", std::move(args));
    int status = 0;
    ::waitpid(pid, &status, 0);
    procs_["cmd"] = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  void StartCoordinator(const std::string& config, const std::string& data = "data") {
    Start("coordinator", {"coordinator", "--keys", keys_, "--data", (dir_ / data).string(), "--listen", endpoint_,
                          "--http", "127.0.0.1:" + std::to_string(http_port_), "--config", config, "--shared-dir",
                          (dir_ / (data + "-shared")).string()});
    ASSERT_TRUE(WaitFor([&] { return Get("/api/cluster").is_object(); }, 10s)) << Log("coordinator");
  }

  void StartNode(const std::string& key_name, const std::string& data = "", int cpu_slots = 1) {
    std::vector<std::string> args{
        "node", "--join", endpoint_, "--keys", keys_, "--key-name", key_name, "--cpu-slots", std::to_string(cpu_slots)};
    if (!data.empty()) args.insert(args.end(), {"--data", (dir_ / data).string()});
    Start(key_name, args);
  }

  // The job's loss per step, from /api/job's history.
  std::map<int, double> LossByStep() {
    std::map<int, double> out;
    json j = Get("/api/job");
    if (j.is_object())
      for (const json& p : j["history"]) out[p["step"].get<int>()] = p["loss"].get<double>();
    return out;
  }

  // SIGKILL and reap.
  void Kill(const std::string& name) {
    ASSERT_GT(procs_[name], 0) << "no running process '" << name << "'";
    ::kill(procs_[name], SIGKILL);
    ::waitpid(procs_[name], nullptr, 0);
    procs_[name] = -1;
  }

  // Exit code once the process ends within `timeout`; -1 otherwise.
  int WaitExit(const std::string& name, std::chrono::milliseconds timeout) {
    int status = 0;
    const bool ended = WaitFor([&] { return ::waitpid(procs_[name], &status, WNOHANG) == procs_[name]; }, timeout);
    if (!ended) return -1;
    procs_[name] = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  httplib::Client Client() {
    httplib::Client c("127.0.0.1", http_port_);
    c.set_connection_timeout(1, 0);
    c.set_read_timeout(3, 0);
    return c;
  }

  json Get(const std::string& path) {
    auto c = Client();
    auto res = c.Get(path.c_str());
    if (!res || res->status != 200) return json();
    return json::parse(res->body, nullptr, false);
  }

  std::string Metrics() {
    auto c = Client();
    auto res = c.Get("/metrics");
    return res && res->status == 200 ? res->body : "";
  }

  // Node entry of /api/nodes by key name (null when absent).
  json NodeByName(const std::string& name) {
    json n = Get("/api/nodes");
    if (!n.is_object()) return json();
    for (const json& e : n["nodes"])
      if (e["name"] == name) return e;
    return json();
  }

  size_t CountAlive() {
    json n = Get("/api/nodes");
    size_t c = 0;
    if (n.is_object())
      for (const json& e : n["nodes"]) c += e["state"] == "alive";
    return c;
  }

  uint64_t Epoch() {
    json c = Get("/api/cluster");
    return c.is_object() ? c["epoch"].get<uint64_t>() : 0;
  }

  std::string Log(const std::string& name) { return ReadFile((dir_ / "logs" / (name + ".log")).string()); }

  fs::path dir_;
  std::string keys_, endpoint_, token_;
  int port_ = 0, http_port_ = 0;
  std::map<std::string, pid_t> procs_;
};

TEST_F(ClusterTest, ThreeNodesJoin) {
  StartCoordinator(WriteConfig(20));
  for (int i = 1; i <= 3; ++i) StartNode("node" + std::to_string(i));
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 3; }, 15s)) << Get("/api/nodes").dump();
  json nodes = Get("/api/nodes");
  ASSERT_EQ(nodes["nodes"].size(), 3u);
  for (const json& n : nodes["nodes"]) {
    EXPECT_EQ(n["devices"].size(), 1u);
    EXPECT_EQ(n["devices"][0]["kind"], "cpu");
    EXPECT_LT(n["last_heartbeat_age_s"].get<double>(), 1.5);
  }
  EXPECT_GE(nodes["epoch"].get<uint64_t>(), 3u);
  // The small job runs to completion on one of them.
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["state"] == "completed"; }, 20s)) << Get("/api/job").dump();
  json job = Get("/api/job");
  EXPECT_EQ(job["step"], 20);
  EXPECT_EQ(job["history"].size(), 20u);
  EXPECT_TRUE(job["val_loss"].is_number());
}

TEST_F(ClusterTest, KilledNodeIsDetectedWithinTheTimeoutAndRejoins) {
  StartCoordinator(WriteConfig(20));
  for (int i = 1; i <= 3; ++i) StartNode("node" + std::to_string(i));
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 3; }, 15s));
  const std::string id = NodeByName("node2")["id"];
  const uint64_t epoch = Epoch();
  const auto killed = Clock::now();
  Kill("node2");
  ASSERT_TRUE(WaitFor([&] { return NodeByName("node2")["state"] == "dead"; }, 6s));
  const double detect_s = std::chrono::duration<double>(Clock::now() - killed).count();
  std::printf("failure detection: node declared dead %.2f s after SIGKILL (timeout 3 s, heartbeats 0.5 s)\n", detect_s);
  EXPECT_GE(detect_s, 2.4);  // the last heartbeat is at most 0.5 s old when it dies
  EXPECT_LE(detect_s, 3.8);  // timeout + tick + polling
  EXPECT_GT(Epoch(), epoch);
  EXPECT_EQ(CountAlive(), 2u);
  const uint64_t dead_epoch = Epoch();
  StartNode("node2");
  ASSERT_TRUE(WaitFor([&] { return NodeByName("node2")["state"] == "alive"; }, 10s));
  EXPECT_EQ(NodeByName("node2")["id"], id);  // same identity
  EXPECT_GT(Epoch(), dead_epoch);
  EXPECT_NE(Metrics().find("troupe_nodes{state=\"alive\"} 3"), std::string::npos) << Metrics();
}

TEST_F(ClusterTest, ANodeRefusesABadRankHost) {
  ASSERT_NE(
      RunToEnd({"node", "--join", endpoint_, "--keys", keys_, "--key-name", "node1", "--rank-host", "host;rm -rf /"}),
      0);
  EXPECT_NE(Log("cmd").find("--rank-host 'host;rm -rf /' is not a host name or IP address"), std::string::npos)
      << Log("cmd");
}

TEST_F(ClusterTest, ACoordinatorRefusesASharedDirItCannotCreate) {
  std::ofstream(dir_ / "a_file") << "x";
  const std::string bad = (dir_ / "a_file" / "shared").string();
  ASSERT_NE(
      RunToEnd({"coordinator", "--keys", keys_, "--data", (dir_ / "data").string(), "--listen", endpoint_, "--http",
                "127.0.0.1:" + std::to_string(http_port_), "--config", WriteConfig(20), "--shared-dir", bad}),
      0);
  EXPECT_NE(Log("cmd").find("cannot create --shared-dir " + bad), std::string::npos) << Log("cmd");
}

TEST_F(ClusterTest, NodeWithAKeyNotInTheAllowListIsRefused) {
  // A valid key pair that the coordinator's allow-list does not hold.
  const std::string other = (dir_ / "other").string();
  ASSERT_EQ(RunToEnd({"keys", "--out", other, "--nodes", "1"}), 0);
  fs::copy_file(other + "/node1.key", keys_ + "/rogue.key");
  StartCoordinator(WriteConfig(20));
  StartNode("node1");
  StartNode("rogue");
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 1; }, 15s));
  const int code = WaitExit("rogue", 15s);
  EXPECT_NE(code, 0) << Log("rogue");
  EXPECT_NE(Log("rogue").find("refused"), std::string::npos) << Log("rogue");
  EXPECT_TRUE(NodeByName("rogue").is_null());
  EXPECT_EQ(Get("/api/nodes")["nodes"].size(), 1u);
  const std::string m = Metrics();
  EXPECT_EQ(m.find("troupe_refused_connections_total 0"), std::string::npos) << m;
  EXPECT_NE(m.find("troupe_refused_connections_total"), std::string::npos) << m;
  EXPECT_NE(Log("coordinator").find("refused a connection"), std::string::npos) << Log("coordinator");
}

TEST_F(ClusterTest, MutatingEndpointsNeedTheBearerToken) {
  StartCoordinator(WriteConfig(1000000));
  StartNode("node1");
  StartNode("node2");
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 2 && Get("/api/job")["state"] == "running"; }, 15s));
  auto c = Client();
  auto r = c.Post("/api/job/stop");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_TRUE(json::parse(r->body, nullptr, false).contains("error"));
  r = c.Post("/api/job/stop", httplib::Headers{{"Authorization", "Bearer wrong"}}, "", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  r = c.Post("/api/nodes/n1/drain");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  const httplib::Headers auth{{"Authorization", "Bearer " + token_}};
  r = c.Post("/api/nodes/n99/drain", auth, "", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  r = c.Get("/api/no/such/thing");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  r = c.Post("/api/job/stop", auth, "", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(Get("/api/job")["state"], "stopped");
  // Drain: the node leaves cleanly and its process ends with 0.
  const std::string id = NodeByName("node2")["id"];
  r = c.Post(("/api/nodes/" + id + "/drain").c_str(), auth, "", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(WaitExit("node2", 10s), 0) << Log("node2");
  EXPECT_TRUE(WaitFor([&] { return NodeByName("node2")["state"] == "left"; }, 5s));
}

TEST_F(ClusterTest, JobIsReassignedWhenItsNodeDies) {
  StartCoordinator(WriteConfig(1000000));
  StartNode("node1");
  StartNode("node2");
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["step"].is_number() && Get("/api/job")["step"] > 10; }, 20s));
  json job = Get("/api/job");
  const std::string first = job["node_id"];
  EXPECT_EQ(job["attempt"], 1);
  std::string victim;
  const json nodes = Get("/api/nodes");  // (not a temporary: the loop keeps references into it)
  for (const json& n : nodes["nodes"])
    if (n["id"].get<std::string>() == first) victim = n["name"].get<std::string>();
  ASSERT_FALSE(victim.empty()) << job.dump() << Get("/api/nodes").dump();
  Kill(victim);
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["attempt"] == 2; }, 8s)) << Get("/api/job").dump();
  job = Get("/api/job");
  EXPECT_NE(job["node_id"], first);
  EXPECT_EQ(job["interruptions"], 1);
  EXPECT_TRUE(WaitFor([&] { return Get("/api/job")["step"] > 5; }, 10s));  // restarted from step 0
}

// Checkpoints in the cluster: every save is written on the job's node and
// replicated to a second node before the coordinator commits it; killing the
// job's node moves the job to the other node, which resumes from the newest
// checkpoint (its own replica) and ends with the very losses of an
// uninterrupted run.
TEST_F(ClusterTest, CheckpointsReplicateAndTheReassignedJobResumesBitExactly) {
  const std::string config = WriteConfig(6000, "[checkpoint]\nevery = 250\nkeep_last = 2\n");
  // The reference: one node, no interruption.
  StartCoordinator(config, "straight");
  StartNode("node3", "straight-node3");
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["state"] == "completed"; }, 120s)) << Log("coordinator");
  const std::map<int, double> straight = LossByStep();
  const json straight_ckpts = Get("/api/checkpoints");
  ASSERT_TRUE(straight_ckpts.is_object()) << Log("coordinator");
  EXPECT_EQ(straight_ckpts["checkpoints"].size(), 2u) << straight_ckpts.dump();  // keep_last = 2
  Kill("node3");
  Kill("coordinator");

  StartCoordinator(config);
  StartNode("node1", "node1");
  StartNode("node2", "node2");
  // A committed checkpoint with a copy on both nodes.
  json ckpt;
  ASSERT_TRUE(WaitFor(
      [&] {
        json c = Get("/api/checkpoints");
        if (!c.is_object() || c["checkpoints"].empty()) return false;
        ckpt = c["checkpoints"].back();
        return ckpt["step"].get<int>() >= 500;
      },
      60s))
      << Log("coordinator");
  EXPECT_EQ(ckpt["replication"], 2) << ckpt.dump();
  EXPECT_EQ(ckpt["nodes"].size(), 2u) << ckpt.dump();
  json job = Get("/api/job");
  ASSERT_EQ(job["state"], "running") << job.dump();
  const std::string first = job["node_id"];
  std::string victim;
  const json nodes = Get("/api/nodes");
  for (const json& n : nodes["nodes"])
    if (n["id"].get<std::string>() == first) victim = n["name"].get<std::string>();
  ASSERT_FALSE(victim.empty());
  Kill(victim);
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["attempt"] == 2; }, 10s)) << Get("/api/job").dump();
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["state"] == "completed"; }, 120s))
      << Get("/api/job").dump() << Log("coordinator") << Log(victim == "node1" ? "node2" : "node1");
  const std::string out = Log("coordinator");
  EXPECT_NE(out.find("resuming from ckpt-"), std::string::npos) << out;
  const std::map<int, double> resumed = LossByStep();
  ASSERT_EQ(resumed.size(), straight.size());
  int compared = 0;
  for (const auto& [step, loss] : straight) {
    auto it = resumed.find(step);
    ASSERT_NE(it, resumed.end()) << "step " << step;
    EXPECT_EQ(it->second, loss) << "step " << step;  // bitwise: the resumed run continues the same numbers
    ++compared;
  }
  EXPECT_EQ(compared, 5000);  // the history keeps the last 5000 steps
}

// A distributed job (pp 2, as many replicas as fit) on the cluster's
// workers, elastic both ways. It starts on the first node's two workers
// (one replica); when a second node joins it grows to two replicas at its
// next checkpoint; when that node is killed, the next attempt is planned on
// the survivor with one replica again. Each attempt resumes from the newest
// checkpoint the ranks committed in the shared folder and continues the
// same losses: the global batch is the same in every layout, so only the
// summation order of the gradients differs.
TEST_F(ClusterTest, ADistributedJobGrowsOntoAJoiningNodeAndShrinksWhenItDies) {
  StartCoordinator(WriteConfig(1500, "[checkpoint]\nevery = 100\n[parallel]\npp = 2\ndp = 0\n"));
  StartNode("node1", "", 2);
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["step"].is_number() && Get("/api/job")["step"] > 50; }, 60s))
      << Get("/api/job").dump() << Log("coordinator");
  json job = Get("/api/job");
  EXPECT_EQ(job["dp"], 1);
  ASSERT_EQ(job["ranks"].size(), 2u) << job.dump();
  StartNode("node2", "", 2);
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["dp"] == 2 && Get("/api/job")["step"] > 250; }, 120s))
      << Get("/api/job").dump() << Log("coordinator");
  job = Get("/api/job");
  ASSERT_EQ(job["ranks"].size(), 4u) << job.dump();
  std::set<std::string> nodes_of_attempt;
  for (const json& r : job["ranks"]) nodes_of_attempt.insert(r["node_id"].get<std::string>());
  EXPECT_EQ(nodes_of_attempt.size(), 2u) << job.dump();
  EXPECT_EQ(job["interruptions"], 0);  // growing is no interruption
  std::string out = Log("coordinator");
  EXPECT_NE(out.find("growing to 2 replicas from checkpoint ckpt-"), std::string::npos) << out;
  const std::map<int, double> before = LossByStep();
  const uint64_t grown_attempt = job["attempt"];
  Kill("node2");
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["attempt"] == grown_attempt + 1; }, 15s))
      << Get("/api/job").dump() << Log("coordinator");
  job = Get("/api/job");
  EXPECT_EQ(job["dp"], 1) << job.dump();
  ASSERT_EQ(job["ranks"].size(), 2u) << job.dump();
  EXPECT_EQ(job["ranks"][0]["node_id"], job["ranks"][1]["node_id"]);
  EXPECT_EQ(job["interruptions"], 1);
  const int resumed_at = job["step"];  // the checkpoint's step, until the first report
  EXPECT_GE(resumed_at, 200) << job.dump();
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["state"] == "completed"; }, 240s))
      << Get("/api/job").dump() << Log("coordinator") << Log("node1");
  const std::map<int, double> after = LossByStep();
  ASSERT_TRUE(before.count(resumed_at + 1)) << "the grown attempt reached step " << before.rbegin()->first;
  ASSERT_TRUE(after.count(resumed_at + 1));
  EXPECT_NEAR(after.at(resumed_at + 1), before.at(resumed_at + 1), 1e-4 * std::abs(before.at(resumed_at + 1)));
  EXPECT_EQ(after.rbegin()->first, 1500);
}

// A damaged local copy is caught by its checksum at restore, and the shard
// comes from another node's replica instead.
TEST_F(ClusterTest, ADamagedCopyIsFetchedFromAnotherNodesReplica) {
  StartCoordinator(WriteConfig(1000000, "[checkpoint]\nevery = 300\nreplication = 3\n"));
  for (const char* n : {"node1", "node2", "node3"}) StartNode(n, n);
  json ckpt;
  ASSERT_TRUE(WaitFor(
      [&] {
        json c = Get("/api/checkpoints");
        if (!c.is_object() || c["checkpoints"].empty()) return false;
        ckpt = c["checkpoints"].back();
        return ckpt["step"].get<int>() >= 600;
      },
      60s))
      << Log("coordinator");
  ASSERT_EQ(ckpt["replication"], 3) << ckpt.dump();
  const std::string job_node = Get("/api/job")["node_id"];
  std::map<std::string, std::string> name_of;
  const json nodes = Get("/api/nodes");
  for (const json& n : nodes["nodes"]) name_of[n["id"]] = n["name"];
  const std::string victim = name_of[job_node];
  Kill(victim);                        // no save after this one: the next attempt resumes from the newest
  std::this_thread::sleep_for(500ms);  // a save the victim had finished may still be committing
  const std::string newest = Get("/api/checkpoints")["checkpoints"].back()["id"];
  // Flip one byte of a different shard in each survivor's copy.
  double where = 0.3;
  std::vector<std::string> survivors;
  for (const char* n : {"node1", "node2", "node3"}) {
    if (victim == n) continue;
    survivors.push_back(n);
    const fs::path chunks = dir_ / n / "store" / "chunks" / (newest + ".chunks");
    ASSERT_TRUE(fs::exists(chunks)) << chunks;
    std::fstream f(chunks, std::ios::in | std::ios::out | std::ios::binary);
    const auto size = static_cast<std::streamoff>(fs::file_size(chunks));
    f.seekg(static_cast<std::streamoff>(size * where));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(size * where));
    f.write(&c, 1);
    where += 0.4;
  }
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["attempt"] == 2; }, 10s)) << Get("/api/job").dump();
  const int resumed_at = ckpt["step"].get<int>();
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["step"].get<int>() > resumed_at + 10; }, 30s))
      << Get("/api/job").dump() << Log("coordinator");
  EXPECT_NE(Log("coordinator").find("resuming from " + newest), std::string::npos) << Log("coordinator");
  const std::string runner = name_of[Get("/api/job")["node_id"]];
  const std::string log = Log(runner);
  EXPECT_NE(log.find("fetching 1 shards of " + newest), std::string::npos) << log;
  EXPECT_NE(log.find("local copy of"), std::string::npos) << log;
}

TEST_F(ClusterTest, RestartedCoordinatorRecoversStateAndNodesReconnect) {
  const std::string config = WriteConfig(1000000);
  StartCoordinator(config);
  StartNode("node1");
  StartNode("node2");
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 2 && Get("/api/job")["step"] > 5; }, 20s));
  const uint64_t epoch = Epoch();
  const json job = Get("/api/job");
  Kill("coordinator");
  // Down for longer than the failure timeout, so the nodes give up on the old
  // connection and their join backoff reaches its ceiling.
  std::this_thread::sleep_for(6s);
  StartCoordinator(config);
  json c = Get("/api/cluster");
  EXPECT_GT(c["epoch"].get<uint64_t>(), epoch);  // recovered, plus one for the restart
  // Both nodes come back on their own, without being restarted.
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 2; }, 10s)) << Get("/api/nodes").dump();
  json after = Get("/api/job");
  EXPECT_EQ(after["attempt"], job["attempt"]);  // the same attempt goes on
  EXPECT_EQ(after["node_id"], job["node_id"]);
  EXPECT_TRUE(WaitFor([&] { return Get("/api/job")["step"] > job["step"]; }, 10s)) << Get("/api/job").dump();
  EXPECT_EQ(WaitExit("node1", 0ms), -1);  // still the same processes
}

// A distributed job's ranks talk to each other directly: they go on while
// the coordinator is down, and the restarted coordinator takes the same
// attempt's reports (its record names every rank's node).
TEST_F(ClusterTest, ADistributedJobOutlivesACoordinatorRestart) {
  const std::string config = WriteConfig(1000000, "[parallel]\npp = 2\n");
  StartCoordinator(config);
  StartNode("node1");
  StartNode("node2");
  ASSERT_TRUE(WaitFor([&] { return Get("/api/job")["step"].is_number() && Get("/api/job")["step"] > 5; }, 30s))
      << Get("/api/job").dump() << Log("coordinator");
  const json job = Get("/api/job");
  ASSERT_EQ(job["ranks"].size(), 2u) << job.dump();
  EXPECT_NE(job["ranks"][0]["node_id"], job["ranks"][1]["node_id"]);  // one worker per node
  Kill("coordinator");
  std::this_thread::sleep_for(6s);
  StartCoordinator(config);
  ASSERT_TRUE(WaitFor([&] { return CountAlive() == 2; }, 10s)) << Get("/api/nodes").dump();
  // Six seconds of steps taken while nobody listened to their reports.
  EXPECT_TRUE(WaitFor([&] { return Get("/api/job")["step"].get<int>() > job["step"].get<int>() + 50; }, 10s))
      << Get("/api/job").dump();
  const json after = Get("/api/job");
  EXPECT_EQ(after["attempt"], job["attempt"]);  // the same attempt went on
  EXPECT_EQ(after["ranks"], job["ranks"]);
  EXPECT_EQ(after["interruptions"], 0);
}

TEST_F(ClusterTest, MalformedBytesNeverCrashTheCoordinator) {
  StartCoordinator(WriteConfig(20));
  // 1. Raw TCP garbage.
  for (int round = 0; round < 20; ++round) {
    int s = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port_);
    if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
      std::mt19937 rng(round);
      std::string junk(64 + rng() % 4096, '\0');
      for (char& ch : junk) ch = static_cast<char>(rng());
      if (round % 4 == 0) junk.replace(0, 10, "\xff\0\0\0\0\0\0\0\x01\x7f", 10);  // a ZMTP-like greeting
      (void)!::send(s, junk.data(), junk.size(), MSG_NOSIGNAL);
    }
    ::close(s);
  }
  // 2. An authenticated client sending garbage frames and bad payloads.
  auto kp = troupe::transport::ReadKeyPair(troupe::protocol::NodeKeyPath(keys_, "node3"));
  auto server_key = troupe::transport::ReadPublicKey(troupe::protocol::CoordinatorPublicKeyPath(keys_));
  ASSERT_TRUE(kp.ok() && server_key.ok());
  auto client = troupe::transport::SecureClient::Connect(endpoint_, *server_key, *kp);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE((*client)->WaitForHandshake(5000).ok());
  std::mt19937 rng(3);
  for (int i = 0; i < 300; ++i) {
    std::vector<uint8_t> payload(rng() % 200);
    for (auto& b : payload) b = static_cast<uint8_t>(rng());
    const uint16_t type = i % 3 == 0 ? static_cast<uint16_t>(rng()) : static_cast<uint16_t>(256 + i % 12);
    ASSERT_TRUE((*client)->Send(type, payload).ok());
  }
  // Well-formed messages that lie: a heartbeat and a report for nodes that do not exist.
  troupe::protocol::Heartbeat hb{"n77", 1, 1};
  ASSERT_TRUE((*client)->Send(static_cast<uint16_t>(hb.kType), troupe::transport::Serialize(hb)).ok());
  troupe::protocol::StepReport rep;
  rep.node_id = "n1";
  rep.attempt = 99;
  ASSERT_TRUE((*client)->Send(static_cast<uint16_t>(rep.kType), troupe::transport::Serialize(rep)).ok());
  ASSERT_TRUE(WaitFor([&] { return Metrics().find("troupe_bad_messages_total 0") == std::string::npos; }, 5s));
  // Still alive and serving; nobody joined.
  EXPECT_EQ(WaitExit("coordinator", 500ms), -1) << Log("coordinator");
  EXPECT_TRUE(Get("/api/cluster").is_object());
  EXPECT_EQ(Get("/api/nodes")["nodes"].size(), 0u);
  // And a real node can still join.
  StartNode("node1");
  EXPECT_TRUE(WaitFor([&] { return CountAlive() == 1; }, 10s));
}

}  // namespace
