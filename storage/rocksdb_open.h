// Opening the embedded RocksDB databases Troupe keeps (coordinator state,
// checkpoint catalog, shard stores) the same way: <dir>/<name>, the folder
// created if needed, bounded open files and info logs, and one error line
// naming `what` and the path when RocksDB refuses (e.g. another process
// holds its lock).
#pragma once

#include <rocksdb/db.h>

#include <memory>
#include <string>

#include "common/status.h"

namespace troupe {

// Options every database starts from; callers tune them (memtables,
// compression) before OpenRocksDb.
rocksdb::Options DefaultRocksDbOptions();

Expected<std::unique_ptr<rocksdb::DB>> OpenRocksDb(const std::string& dir, const std::string& name,
                                                   const std::string& what,
                                                   const rocksdb::Options& options = DefaultRocksDbOptions());

// <dir>/<name> for reading only: creates nothing and takes no lock, so other
// processes may read the same database at once (a writer must not be
// changing it meanwhile). NotFound naming the path when there is none.
Expected<std::unique_ptr<rocksdb::DB>> OpenRocksDbReadOnly(const std::string& dir, const std::string& name,
                                                           const std::string& what);

}  // namespace troupe
