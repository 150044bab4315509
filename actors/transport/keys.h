// CURVE key material: generation, key files, allow-lists.
//
// Keys are Z85 text (40 characters for 32 bytes), as zmq_curve_keypair makes
// them. Files are small versioned text files:
//
//   keypair file (mode 0600)           public-key file (mode 0644)
//   ------------------------           ---------------------------
//   troupe-curve-keypair 1             troupe-curve-public 1
//   public <40 Z85 chars>              public <40 Z85 chars>
//   secret <40 Z85 chars>
//
//   allow-list file: one Z85 public key per line; blank lines and '#'
//   comments are ignored: a line starting with '#' that is not itself a key
//   ('#' is a Z85 character; write "# text"), or "<key>  # text".
//
// Writes are atomic (temp file in the same directory, fsync, rename), so a
// reader never sees half a key. Every function is thread-safe (no shared
// state) and returns errors as values.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::transport {

inline constexpr size_t kZ85KeyChars = 40;

struct KeyPair {
  std::string public_key;  // Z85, 40 chars
  std::string secret_key;  // Z85, 40 chars; never log it
};

// A fresh CURVE key pair (zmq_curve_keypair). Unimplemented if libzmq was
// built without CURVE.
Expected<KeyPair> GenerateKeyPair();

// OK iff `key` is 40 Z85 characters that decode to 32 bytes.
// `what` names the key in the error ("server public key").
Status ValidateKey(const std::string& key, const std::string& what = "key");

// The public key belonging to a Z85 secret key (zmq_curve_public).
Expected<std::string> PublicKeyFromSecret(const std::string& secret_key);

// Checks both keys' syntax and that the public key matches the secret one.
Status ValidateKeyPair(const KeyPair& pair);

// Keypair file: written with mode 0600, atomically. IOError if the directory
// is missing or unwritable; InvalidArgument if `pair` is not valid.
Status WriteKeyPair(const std::string& path, const KeyPair& pair);
// NotFound if missing; Corruption (naming file and line) if malformed or if
// the public key does not match the secret key; IOError if unreadable.
Expected<KeyPair> ReadKeyPair(const std::string& path);

// Public-key file: written with mode 0644, atomically.
Status WritePublicKey(const std::string& path, const std::string& public_key);
// Reads a public-key file, or the public half of a keypair file.
Expected<std::string> ReadPublicKey(const std::string& path);

// Allow-list file (format above); keys deduplicated, in file order.
// Corruption names the file and line of the first bad key.
Expected<std::vector<std::string>> ReadAllowList(const std::string& path);
// Writes an allow-list atomically (mode 0644), with a header comment.
Status WriteAllowList(const std::string& path, const std::vector<std::string>& public_keys);

}  // namespace troupe::transport
