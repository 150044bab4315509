#include "storage/rocksdb_open.h"

#include <filesystem>

namespace troupe {

rocksdb::Options DefaultRocksDbOptions() {
  rocksdb::Options opts;
  opts.create_if_missing = true;
  opts.max_open_files = 64;
  opts.keep_log_file_num = 2;
  return opts;
}

Expected<std::unique_ptr<rocksdb::DB>> OpenRocksDb(const std::string& dir, const std::string& name,
                                                   const std::string& what, const rocksdb::Options& options) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError(what + ": cannot create " + dir + ": " + ec.message());
  rocksdb::DB* db = nullptr;
  const std::string path = dir + "/" + name;
  rocksdb::Status s = rocksdb::DB::Open(options, path, &db);
  if (!s.ok()) return Status::IOError(what + ": cannot open " + path + ": " + s.ToString());
  return std::unique_ptr<rocksdb::DB>(db);
}

Expected<std::unique_ptr<rocksdb::DB>> OpenRocksDbReadOnly(const std::string& dir, const std::string& name,
                                                           const std::string& what) {
  const std::string path = dir + "/" + name;
  std::error_code ec;
  if (!std::filesystem::is_directory(path, ec)) return Status::NotFound(what + ": no database at " + path);
  rocksdb::Options options = DefaultRocksDbOptions();
  options.create_if_missing = false;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::OpenForReadOnly(options, path, &db);
  if (!s.ok()) return Status::IOError(what + ": cannot open " + path + " for reading: " + s.ToString());
  return std::unique_ptr<rocksdb::DB>(db);
}

}  // namespace troupe
