// For storage tests: what a RocksDB database really holds, read behind the
// back of the code under test.
#pragma once

#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <memory>
#include <string>
#include <vector>

namespace troupe::testing {

// Every key of the closed database at `path`.
inline std::vector<std::string> RawKeys(const std::string& path) {
  rocksdb::DB* db = nullptr;
  rocksdb::Options opts;
  rocksdb::Status s = rocksdb::DB::Open(opts, path, &db);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::vector<std::string> keys;
  if (!s.ok()) return keys;
  {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekToFirst(); it->Valid(); it->Next()) keys.push_back(it->key().ToString());
  }
  delete db;
  return keys;
}

}  // namespace troupe::testing
