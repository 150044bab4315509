// What `troupe keys --out DIR` writes and who reads it (every file 0600):
//
//   DIR/coordinator.key     coordinator CURVE key pair      (coordinator)
//   DIR/coordinator.pub     coordinator public key          (nodes pin it)
//   DIR/<name>.key          a node's key pair, name "node1".. (that node)
//   DIR/allowed_clients     allow-list: node public keys    (coordinator's ZAP)
//   DIR/http.token          bearer token of the mutating HTTP endpoints
#pragma once

#include <string>

namespace troupe::protocol {

inline std::string CoordinatorKeyPath(const std::string& dir) { return dir + "/coordinator.key"; }
inline std::string CoordinatorPublicKeyPath(const std::string& dir) { return dir + "/coordinator.pub"; }
inline std::string NodeKeyPath(const std::string& dir, const std::string& name) { return dir + "/" + name + ".key"; }
inline std::string AllowListPath(const std::string& dir) { return dir + "/allowed_clients"; }
inline std::string HttpTokenPath(const std::string& dir) { return dir + "/http.token"; }

}  // namespace troupe::protocol
