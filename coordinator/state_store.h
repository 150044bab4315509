// StateStore: the coordinator's durable state in RocksDB (<data dir>/state).
//
// Two keys, each a JSON document that starts with its format name and
// version, written with WriteOptions::sync (on disk before the call returns):
//
//   "membership" -> {"format":"troupe.membership","version":1,"epoch":..,
//                    "next_id":..,"nodes":[{id,name,host,state,...}]}
//   "job"        -> {"format":"troupe.job","version":1,"state":..,"attempt":..,
//                    "step":..,"history":[...] ...}
//
// A value that is not JSON, has another format name, an unknown version or
// a missing/ill-typed field yields Status::Corruption naming the key and the
// problem: the coordinator refuses to start rather than guess.
//
// Thread-safety: every method may be called from any thread (RocksDB is
// thread-safe); the membership and job actors each write their own key.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "common/status.h"
#include "coordinator/job_record.h"
#include "coordinator/membership.h"

namespace rocksdb {
class DB;
}

namespace troupe::cluster {

inline constexpr int kMembershipFormatVersion = 1;
inline constexpr int kJobFormatVersion = 1;

class StateStore {
 public:
  // Opens (creating if needed) <dir>/state. IOError when RocksDB refuses
  // (e.g. another coordinator holds the lock).
  static Expected<std::unique_ptr<StateStore>> Open(const std::string& dir);
  ~StateStore();

  Status SaveMembership(const MembershipSnapshot& snap);
  // nullopt when never saved; Corruption on a damaged value.
  Expected<std::optional<MembershipSnapshot>> LoadMembership();

  Status SaveJob(const JobRecord& job);
  Expected<std::optional<JobRecord>> LoadJob();

  // For tests: write raw bytes under a key.
  Status PutRaw(const std::string& key, const std::string& value);

  // The JSON forms (exposed for tests and the HTTP API's reuse).
  static std::string EncodeMembership(const MembershipSnapshot& snap);
  static Expected<MembershipSnapshot> DecodeMembership(const std::string& bytes);
  static std::string EncodeJob(const JobRecord& job);
  static Expected<JobRecord> DecodeJob(const std::string& bytes);

 private:
  explicit StateStore(rocksdb::DB* db) : db_(db) {}
  Expected<std::optional<std::string>> Get(const std::string& key);
  rocksdb::DB* db_;
};

}  // namespace troupe::cluster
