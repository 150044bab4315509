// CURVE key generation, key files and allow-lists (formats in keys.h).
#include "actors/transport/keys.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

namespace troupe::transport {
namespace {

constexpr const char* kKeyPairMagic = "troupe-curve-keypair 1";
constexpr const char* kPublicMagic = "troupe-curve-public 1";
constexpr size_t kMaxKeyFileBytes = 64 * 1024;  // key files are ~100 bytes

std::string Errno() { return std::strerror(errno); }

std::string Trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// Writes `text` to `path` atomically with the given mode.
Status AtomicWrite(const std::string& path, const std::string& text, mode_t mode) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return Status::IOError("keys: cannot create " + tmp + ": " + Errno());
  // O_CREAT's mode is filtered by the umask; set it exactly (0600 matters).
  bool ok = ::fchmod(fd, mode) == 0;
  size_t done = 0;
  while (ok && done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    if (ok) done += static_cast<size_t>(n);
  }
  ok = ok && ::fsync(fd) == 0;
  const std::string err = ok ? "" : Errno();
  ::close(fd);
  if (!ok) {
    ::unlink(tmp.c_str());
    return Status::IOError("keys: cannot write " + tmp + ": " + err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string e = Errno();
    ::unlink(tmp.c_str());
    return Status::IOError("keys: cannot rename " + tmp + " to " + path + ": " + e);
  }
  // Make the rename durable.
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

Expected<std::vector<std::string>> ReadLines(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::NotFound("keys: no such file: " + path);
    return Status::IOError("keys: cannot stat " + path + ": " + Errno());
  }
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument("keys: not a regular file: " + path);
  if (static_cast<size_t>(st.st_size) > kMaxKeyFileBytes) {
    return Status::Corruption("keys: " + path + " is " + std::to_string(st.st_size) +
                              " bytes, too large for a key file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("keys: cannot open " + path + ": " + Errno());
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  if (in.bad()) return Status::IOError("keys: error reading " + path);
  return lines;
}

// Parses "<field> <key>" on line `lineno` of `path`.
Expected<std::string> ParseField(const std::vector<std::string>& lines, size_t lineno, const std::string& field,
                                 const std::string& path) {
  const std::string where = path + ":" + std::to_string(lineno + 1);
  if (lineno >= lines.size()) return Status::Corruption("keys: " + where + ": missing '" + field + " <key>' line");
  const std::string line = Trim(lines[lineno]);
  if (line.rfind(field + " ", 0) != 0) return Status::Corruption("keys: " + where + ": expected '" + field + " <key>'");
  const std::string key = Trim(line.substr(field.size() + 1));
  const Status st = ValidateKey(key, field + " key");
  if (!st.ok()) return Status::Corruption("keys: " + where + ": " + st.message());
  return key;
}

Status CheckMagic(const std::vector<std::string>& lines, const char* magic, const std::string& path) {
  if (lines.empty()) return Status::Corruption("keys: " + path + " is empty");
  if (Trim(lines[0]) != magic) {
    return Status::Corruption("keys: " + path + ":1: expected '" + magic + "', got '" + Trim(lines[0]).substr(0, 40) +
                              "'");
  }
  return Status::Ok();
}

}  // namespace

Expected<KeyPair> GenerateKeyPair() {
  char pub[kZ85KeyChars + 1] = {};
  char sec[kZ85KeyChars + 1] = {};
  if (zmq_curve_keypair(pub, sec) != 0) {
    if (errno == ENOTSUP) return Status::Unimplemented("keys: libzmq was built without CURVE");
    return Status::Internal(std::string("keys: zmq_curve_keypair: ") + zmq_strerror(errno));
  }
  return KeyPair{pub, sec};
}

Status ValidateKey(const std::string& key, const std::string& what) {
  if (key.size() != kZ85KeyChars) {
    return Status::InvalidArgument(what + ": expected " + std::to_string(kZ85KeyChars) + " Z85 characters, got " +
                                   std::to_string(key.size()));
  }
  uint8_t raw[32];
  if (zmq_z85_decode(raw, key.c_str()) == nullptr) return Status::InvalidArgument(what + ": not valid Z85");
  return Status::Ok();
}

Expected<std::string> PublicKeyFromSecret(const std::string& secret_key) {
  TROUPE_RETURN_IF_ERROR(ValidateKey(secret_key, "secret key"));
  char pub[kZ85KeyChars + 1] = {};
  if (zmq_curve_public(pub, secret_key.c_str()) != 0) {
    return Status::InvalidArgument(std::string("keys: zmq_curve_public: ") + zmq_strerror(errno));
  }
  return std::string(pub);
}

Status ValidateKeyPair(const KeyPair& pair) {
  TROUPE_RETURN_IF_ERROR(ValidateKey(pair.public_key, "public key"));
  auto pub = PublicKeyFromSecret(pair.secret_key);
  if (!pub.ok()) return pub.status();
  if (pub.value() != pair.public_key) return Status::InvalidArgument("public key does not match the secret key");
  return Status::Ok();
}

Status WriteKeyPair(const std::string& path, const KeyPair& pair) {
  TROUPE_RETURN_IF_ERROR(ValidateKeyPair(pair).WithContext("keys: refusing to write " + path));
  return AtomicWrite(
      path, std::string(kKeyPairMagic) + "\npublic " + pair.public_key + "\nsecret " + pair.secret_key + "\n", 0600);
}

Expected<KeyPair> ReadKeyPair(const std::string& path) {
  TROUPE_ASSIGN_OR_RETURN(auto lines, ReadLines(path));
  TROUPE_RETURN_IF_ERROR(CheckMagic(lines, kKeyPairMagic, path));
  KeyPair pair;
  TROUPE_ASSIGN_OR_RETURN(pair.public_key, ParseField(lines, 1, "public", path));
  TROUPE_ASSIGN_OR_RETURN(pair.secret_key, ParseField(lines, 2, "secret", path));
  const Status st = ValidateKeyPair(pair);
  if (!st.ok()) return Status::Corruption("keys: " + path + ": " + st.message());
  return pair;
}

Status WritePublicKey(const std::string& path, const std::string& public_key) {
  TROUPE_RETURN_IF_ERROR(ValidateKey(public_key, "public key").WithContext("keys: refusing to write " + path));
  return AtomicWrite(path, std::string(kPublicMagic) + "\npublic " + public_key + "\n", 0644);
}

Expected<std::string> ReadPublicKey(const std::string& path) {
  TROUPE_ASSIGN_OR_RETURN(auto lines, ReadLines(path));
  if (!lines.empty() && Trim(lines[0]) == kKeyPairMagic) {
    TROUPE_ASSIGN_OR_RETURN(auto pair, ReadKeyPair(path));
    return pair.public_key;
  }
  TROUPE_RETURN_IF_ERROR(CheckMagic(lines, kPublicMagic, path));
  return ParseField(lines, 1, "public", path);
}

Expected<std::vector<std::string>> ReadAllowList(const std::string& path) {
  TROUPE_ASSIGN_OR_RETURN(auto lines, ReadLines(path));
  std::vector<std::string> keys;
  std::set<std::string> seen;
  for (size_t i = 0; i < lines.size(); ++i) {
    // '#' is a Z85 character, so a key may start with it: the first token is
    // a key if it is one, else a line starting with '#' is a comment.
    const std::string trimmed = Trim(lines[i]);
    const std::string line = trimmed.substr(0, trimmed.find_first_of(" \t"));
    const std::string rest = Trim(trimmed.substr(line.size()));
    if (line.empty()) continue;
    const bool is_key = ValidateKey(line).ok();
    if (!is_key && line[0] == '#') continue;
    if (is_key && !rest.empty() && rest[0] != '#') {
      return Status::Corruption("keys: " + path + ":" + std::to_string(i + 1) + ": unexpected text after the key");
    }
    const Status st = ValidateKey(line, "client public key");
    if (!st.ok()) return Status::Corruption("keys: " + path + ":" + std::to_string(i + 1) + ": " + st.message());
    if (seen.insert(line).second) keys.push_back(line);
  }
  return keys;
}

Status WriteAllowList(const std::string& path, const std::vector<std::string>& public_keys) {
  std::string text = "# troupe CURVE allow-list: one Z85 client public key per line\n";
  for (const auto& k : public_keys) {
    TROUPE_RETURN_IF_ERROR(ValidateKey(k, "client public key").WithContext("keys: refusing to write " + path));
    text += k + "\n";
  }
  return AtomicWrite(path, text, 0644);
}

}  // namespace troupe::transport
