// transport_bench: SecureServer/SecureClient against raw ZeroMQ, between two
// processes (fork) over tcp loopback.
//
//   modes:  raw      ROUTER/DEALER, no CURVE, no envelope (zmq_send / zmq_msg_recv)
//           raw+curve  the same with CURVE keys (no ZAP, no envelope)
//           ours     SecureServer/SecureClient: CURVE + ZAP + envelope + CRC32C
//   tests:  rtt      64 B request, echoed back; median and p99 round trip
//           msgs/s   64 B messages pipelined one way, one ack at the end
//           bulk     64 MiB payloads one way, one ack at the end; GB/s
//
// The parent process is the server, a forked child the client; each process
// makes its own zmq context after the fork. Usage: transport_bench [--quick]
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "actors/transport/keys.h"
#include "actors/transport/socket.h"

namespace {

using namespace troupe::transport;
using Clock = std::chrono::steady_clock;

struct Sizes {
  int rtt_iters = 5000;
  int rtt_warmup = 200;
  int msgs = 200000;
  int bulk_iters = 16;
  size_t small_bytes = 64;
  size_t bulk_bytes = 64u << 20;
};

struct Result {
  double rtt_median_us = 0, rtt_p99_us = 0, msgs_per_s = 0, bulk_gb_s = 0;
};

// One side's transport, reduced to blocking send/receive of one message.
class Side {
 public:
  virtual ~Side() = default;
  virtual bool Send(const uint8_t* data, size_t n) = 0;
  virtual bool Receive() = 0;  // one message, contents discarded
};

// ---- raw ZeroMQ, optionally with CURVE ----
class RawSide : public Side {
 public:
  RawSide(bool server, const std::string& endpoint, const KeyPair* server_keys, const KeyPair* client_keys)
      : server_(server) {
    ctx_ = zmq_ctx_new();
    s_ = zmq_socket(ctx_, server ? ZMQ_ROUTER : ZMQ_DEALER);
    int linger = 0, hwm = 1000;
    zmq_setsockopt(s_, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(s_, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(s_, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    if (server_keys) {
      if (server) {
        int one = 1;
        zmq_setsockopt(s_, ZMQ_CURVE_SERVER, &one, sizeof(one));
        zmq_setsockopt(s_, ZMQ_CURVE_SECRETKEY, server_keys->secret_key.c_str(), 41);
      } else {
        zmq_setsockopt(s_, ZMQ_CURVE_SERVERKEY, server_keys->public_key.c_str(), 41);
        zmq_setsockopt(s_, ZMQ_CURVE_PUBLICKEY, client_keys->public_key.c_str(), 41);
        zmq_setsockopt(s_, ZMQ_CURVE_SECRETKEY, client_keys->secret_key.c_str(), 41);
      }
    }
    if (server) {
      zmq_bind(s_, endpoint.c_str());
      char last[256];
      size_t len = sizeof(last);
      zmq_getsockopt(s_, ZMQ_LAST_ENDPOINT, last, &len);
      endpoint_ = last;
    } else {
      zmq_connect(s_, endpoint.c_str());
    }
  }
  ~RawSide() override {
    zmq_close(s_);
    zmq_ctx_term(ctx_);
  }
  const std::string& endpoint() const { return endpoint_; }
  bool Send(const uint8_t* data, size_t n) override {
    if (server_ && zmq_send(s_, peer_.data(), peer_.size(), ZMQ_SNDMORE) < 0) return false;
    return zmq_send(s_, data, n, 0) >= 0;
  }
  bool Receive() override {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, s_, 0) < 0) return false;
    if (server_) {
      peer_.assign(static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m));
      if (zmq_msg_recv(&m, s_, 0) < 0) return false;
    }
    zmq_msg_close(&m);
    return true;
  }

 private:
  bool server_;
  void* ctx_;
  void* s_;
  std::string endpoint_, peer_;
};

// ---- ours ----
class OursServer : public Side {
 public:
  explicit OursServer(std::unique_ptr<SecureServer> s) : s_(std::move(s)) {}
  bool Send(const uint8_t* data, size_t n) override { return s_->Send(peer_, 1000, {data, n}).ok(); }
  bool Receive() override {
    auto in = s_->Receive(-1);
    if (!in.ok() || !in->has_value()) return false;
    peer_ = (*in)->peer;
    return true;
  }
  SecureServer& server() { return *s_; }

 private:
  std::unique_ptr<SecureServer> s_;
  std::string peer_;
};
class OursClient : public Side {
 public:
  explicit OursClient(std::unique_ptr<SecureClient> c) : c_(std::move(c)) {}
  bool Send(const uint8_t* data, size_t n) override { return c_->Send(1000, {data, n}).ok(); }
  bool Receive() override {
    auto f = c_->Receive(-1);
    return f.ok() && f->has_value();
  }

 private:
  std::unique_ptr<SecureClient> c_;
};

// The server's script, mirroring RunClient.
bool RunServer(Side& s, const Sizes& z) {
  std::vector<uint8_t> small(z.small_bytes, 0x5A);
  for (int i = 0; i < z.rtt_warmup + z.rtt_iters; ++i) {
    if (!s.Receive() || !s.Send(small.data(), small.size())) return false;
  }
  for (int i = 0; i < z.msgs; ++i) {
    if (!s.Receive()) return false;
  }
  if (!s.Send(small.data(), small.size())) return false;
  for (int i = 0; i < z.bulk_iters; ++i) {
    if (!s.Receive()) return false;
  }
  return s.Send(small.data(), small.size());
}

bool RunClient(Side& c, const Sizes& z, Result* r) {
  std::vector<uint8_t> small(z.small_bytes, 0xA5);
  std::vector<double> us;
  for (int i = 0; i < z.rtt_warmup + z.rtt_iters; ++i) {
    const auto t0 = Clock::now();
    if (!c.Send(small.data(), small.size()) || !c.Receive()) return false;
    if (i >= z.rtt_warmup) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  r->rtt_median_us = us[us.size() / 2];
  r->rtt_p99_us = us[us.size() * 99 / 100];

  auto t0 = Clock::now();
  for (int i = 0; i < z.msgs; ++i) {
    if (!c.Send(small.data(), small.size())) return false;
  }
  if (!c.Receive()) return false;
  r->msgs_per_s = z.msgs / std::chrono::duration<double>(Clock::now() - t0).count();

  std::vector<uint8_t> bulk(z.bulk_bytes);
  for (size_t i = 0; i < bulk.size(); ++i) bulk[i] = static_cast<uint8_t>(i * 2654435761u >> 24);
  t0 = Clock::now();
  for (int i = 0; i < z.bulk_iters; ++i) {
    if (!c.Send(bulk.data(), bulk.size())) return false;
  }
  if (!c.Receive()) return false;
  r->bulk_gb_s = double(z.bulk_bytes) * z.bulk_iters / std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;
  return true;
}

enum class Mode { kRaw, kRawCurve, kOurs };
const char* Name(Mode m) {
  return m == Mode::kRaw ? "raw zmq" : m == Mode::kRawCurve ? "raw zmq+CURVE" : "ours (CURVE+ZAP)";
}

// Forks a client; the parent serves. The child sends its Result through a pipe.
bool RunMode(Mode mode, const Sizes& z, const KeyPair& sk, const KeyPair& ck, Result* out) {
  int to_child[2], to_parent[2];
  if (pipe(to_child) != 0 || pipe(to_parent) != 0) return false;
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {  // client
    close(to_child[1]);
    close(to_parent[0]);
    char ep[256] = {};
    if (read(to_child[0], ep, sizeof(ep) - 1) <= 0) _exit(2);
    Result r;
    bool ok = false;
    if (mode == Mode::kOurs) {
      auto c = SecureClient::Connect(ep, sk.public_key, ck);
      if (c.ok() && (*c)->WaitForHandshake(5000).ok()) {
        OursClient side(std::move(c).value());
        ok = RunClient(side, z, &r);
      }
    } else {
      RawSide side(false, ep, mode == Mode::kRawCurve ? &sk : nullptr, &ck);
      ok = RunClient(side, z, &r);
    }
    if (write(to_parent[1], &r, sizeof(r)) != sizeof(r)) _exit(3);
    _exit(ok ? 0 : 1);
  }
  close(to_child[0]);
  close(to_parent[1]);
  bool ok = false;
  auto serve = [&](Side& side, const std::string& ep) {
    if (write(to_child[1], ep.c_str(), ep.size()) != static_cast<ssize_t>(ep.size())) return false;
    return RunServer(side, z);
  };
  if (mode == Mode::kOurs) {
    auto s = SecureServer::Bind("tcp://127.0.0.1:0", sk, {ck.public_key});
    if (s.ok()) {
      const std::string ep = (*s)->endpoint();
      OursServer side(std::move(s).value());
      ok = serve(side, ep);
    }
  } else {
    RawSide side(true, "tcp://127.0.0.1:0", mode == Mode::kRawCurve ? &sk : nullptr, nullptr);
    ok = serve(side, side.endpoint());
  }
  const bool got = read(to_parent[0], out, sizeof(*out)) == sizeof(*out);
  int status = 0;
  waitpid(pid, &status, 0);
  close(to_child[1]);
  close(to_parent[0]);
  return ok && got && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  Sizes z;
  if (argc > 1 && std::strcmp(argv[1], "--quick") == 0) {
    z.rtt_iters = 1000;
    z.msgs = 20000;
    z.bulk_iters = 4;
  }
  auto sk = GenerateKeyPair();
  auto ck = GenerateKeyPair();
  if (!sk.ok() || !ck.ok()) {
    std::fprintf(stderr, "transport_bench: %s\n",
                 sk.ok() ? ck.status().message().c_str() : sk.status().message().c_str());
    return 1;
  }
  const Mode modes[] = {Mode::kRaw, Mode::kRawCurve, Mode::kOurs};
  Result res[3];
  for (int i = 0; i < 3; ++i) {
    if (!RunMode(modes[i], z, sk.value(), ck.value(), &res[i])) {
      std::fprintf(stderr, "transport_bench: mode %s failed\n", Name(modes[i]));
      return 1;
    }
  }
  std::printf(
      "transport_bench: tcp://127.0.0.1, 2 processes, %ld cores; rtt %zu B x %d, msgs %zu B x %d, bulk %zu MiB x "
      "%d\n\n",
      sysconf(_SC_NPROCESSORS_ONLN), z.small_bytes, z.rtt_iters, z.small_bytes, z.msgs, z.bulk_bytes >> 20,
      z.bulk_iters);
  std::printf("| %-18s | %12s | %10s | %12s | %10s |\n", "transport", "rtt p50 (us)", "rtt p99", "msgs/s", "bulk GB/s");
  std::printf("|%s|%s|%s|%s|%s|\n", std::string(20, '-').c_str(), std::string(14, '-').c_str(),
              std::string(12, '-').c_str(), std::string(14, '-').c_str(), std::string(12, '-').c_str());
  for (int i = 0; i < 3; ++i) {
    std::printf("| %-18s | %12.1f | %10.1f | %12.0f | %10.3f |\n", Name(modes[i]), res[i].rtt_median_us,
                res[i].rtt_p99_us, res[i].msgs_per_s, res[i].bulk_gb_s);
  }
  const Result& o = res[2];
  for (int base : {0, 1}) {
    const Result& b = res[base];
    std::printf("| ours / %-11s | %12.2f | %10.2f | %12.2f | %10.2f |\n", base == 0 ? "raw" : "raw+CURVE",
                o.rtt_median_us / b.rtt_median_us, o.rtt_p99_us / b.rtt_p99_us, o.msgs_per_s / b.msgs_per_s,
                o.bulk_gb_s / b.bulk_gb_s);
  }
  return 0;
}
