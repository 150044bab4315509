#include "coordinator/process_util.h"

#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>

#include "actors/protocol/key_layout.h"
#include "actors/transport/keys.h"

namespace troupe::cluster {

std::function<bool(int)> BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  auto stopped = std::make_shared<std::atomic<bool>>(false);
  return [set, stopped](int ms) {
    if (*stopped) return true;
    timespec ts{ms / 1000, static_cast<long>(ms % 1000) * 1000000L};
    const int sig = sigtimedwait(&set, nullptr, &ts);
    if (sig == SIGINT || sig == SIGTERM) *stopped = true;
    return stopped->load();
  };
}

namespace {

Status Chmod600(const std::string& path) {
  if (::chmod(path.c_str(), 0600) != 0) return Status::IOError("cannot chmod 0600 " + path);
  return Status::Ok();
}

Status WriteToken(const std::string& path) {
  std::FILE* r = std::fopen("/dev/urandom", "rb");
  if (!r) return Status::IOError("cannot open /dev/urandom");
  unsigned char buf[32];
  const size_t got = std::fread(buf, 1, sizeof(buf), r);
  std::fclose(r);
  if (got != sizeof(buf)) return Status::IOError("short read from /dev/urandom");
  std::string hex;
  for (unsigned char c : buf) {
    char h[3];
    std::snprintf(h, sizeof(h), "%02x", c);
    hex += h;
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return Status::IOError("cannot write " + tmp);
    out << hex << "\n";
    if (!out.flush()) return Status::IOError("cannot write " + tmp);
  }
  TROUPE_RETURN_IF_ERROR(Chmod600(tmp));
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return Status::IOError("cannot rename " + tmp + ": " + ec.message());
  return Status::Ok();
}

Status EnsureKeyPair(const std::string& path) {
  if (std::filesystem::exists(path)) return transport::ReadKeyPair(path).status();
  TROUPE_ASSIGN_OR_RETURN(transport::KeyPair kp, transport::GenerateKeyPair());
  TROUPE_RETURN_IF_ERROR(transport::WriteKeyPair(path, kp));
  return Chmod600(path);
}

}  // namespace

Status WriteKeysDir(const std::string& dir, int nodes) {
  if (nodes < 0 || nodes > 1000) return Status::InvalidArgument("--nodes must be between 0 and 1000");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create " + dir + ": " + ec.message());
  ::chmod(dir.c_str(), 0700);
  const std::string ckey = protocol::CoordinatorKeyPath(dir);
  TROUPE_RETURN_IF_ERROR(EnsureKeyPair(ckey));
  TROUPE_ASSIGN_OR_RETURN(transport::KeyPair coord, transport::ReadKeyPair(ckey));
  TROUPE_RETURN_IF_ERROR(transport::WritePublicKey(protocol::CoordinatorPublicKeyPath(dir), coord.public_key));
  TROUPE_RETURN_IF_ERROR(Chmod600(protocol::CoordinatorPublicKeyPath(dir)));
  for (int i = 1; i <= nodes; ++i)
    TROUPE_RETURN_IF_ERROR(EnsureKeyPair(protocol::NodeKeyPath(dir, "node" + std::to_string(i))));
  // The allow-list: every node*.key of the directory, in name order.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f.rfind("node", 0) == 0 && e.path().extension() == ".key") names.push_back(f);
  }
  std::sort(names.begin(), names.end());
  std::vector<std::string> keys;
  for (const std::string& f : names) {
    TROUPE_ASSIGN_OR_RETURN(transport::KeyPair kp, transport::ReadKeyPair(dir + "/" + f));
    keys.push_back(kp.public_key);
  }
  TROUPE_RETURN_IF_ERROR(transport::WriteAllowList(protocol::AllowListPath(dir), keys));
  TROUPE_RETURN_IF_ERROR(Chmod600(protocol::AllowListPath(dir)));
  if (!std::filesystem::exists(protocol::HttpTokenPath(dir)))
    TROUPE_RETURN_IF_ERROR(WriteToken(protocol::HttpTokenPath(dir)));
  return Status::Ok();
}

}  // namespace troupe::cluster
