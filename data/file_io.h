// Whole-file reads and atomic whole-file writes for the data pipeline.
//
// WriteFileAtomic writes to "<path>.tmp" and renames it over <path>, so a
// reader never sees a half-written file (a crash leaves at most the .tmp).
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace troupe::data {

// The file's bytes. NotFound if it does not exist, IOError if unreadable.
Expected<std::string> ReadFile(const std::string& path);

// Replaces <path> with `bytes` atomically (temp file, fsync, rename).
// IOError names the path and the OS error; the temp file is removed.
Status WriteFileAtomic(const std::string& path, std::string_view bytes);

}  // namespace troupe::data
