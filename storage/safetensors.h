// Safetensors (Hugging Face) reader and writer, host memory only.
//
// Layout of a file:
//   [8 bytes]  N, little-endian uint64: length of the JSON header
//   [N bytes]  UTF-8 JSON object, right-padded with spaces:
//                {"__metadata__": {"key": "value", ...},
//                 "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
//   [rest]     data buffer; offsets are relative to its start; each tensor is
//              contiguous, row-major, little-endian.
// Readers (ours and Hugging Face's) require the tensors to cover the buffer
// exactly: no gaps, no overlaps, no trailing bytes.
//
// Independent of the compute backend: tensors are plain byte vectors; callers
// copy them to a device. Assumes a little-endian host (checked at compile time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace troupe {

// Bytes per element of a safetensors dtype ("F32", "BF16", "F8_E4M3", "I64",
// "BOOL", ...), or 0 when the dtype is unknown.
size_t SafetensorsDTypeSize(std::string_view dtype);

// One tensor as stored: dtype in safetensors spelling, row-major shape
// (empty = scalar), and exactly numel * dtype size bytes.
struct SafeTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const;
};

// Float views of a tensor. Decode accepts F32, F64, BF16 and F16 (F64 is
// narrowed, BF16/F16 widened exactly); Encode writes `n` floats as one of
// those dtypes (BF16 and F16 round to nearest even). Other dtypes give
// InvalidArgument.
Expected<std::vector<float>> DecodeFloats(const SafeTensor& t);
Expected<std::vector<uint8_t>> EncodeFloats(const float* data, size_t n, std::string_view dtype);

// A parsed file. Tensors are kept in file order (by data offset), which for
// files from SafetensorsWriter is the order they were added.
class SafetensorsFile {
 public:
  const std::string& path() const { return path_; }
  const std::vector<SafeTensor>& tensors() const { return tensors_; }
  std::vector<std::string> names() const;  // file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor called `name`, or nullptr when the file has none.
  const SafeTensor* Find(std::string_view name) const;
  // As Find, but a missing tensor is NotFound naming the file and the tensor.
  Expected<const SafeTensor*> Get(std::string_view name) const;

 private:
  friend Expected<SafetensorsFile> ReadSafetensors(const std::string& path);
  std::string path_;
  std::vector<SafeTensor> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// Reads and validates the whole file. Every failure is a Status whose message
// starts with the path and names the problem: NotFound for a missing file,
// IOError when the OS refuses a read, Corruption for anything malformed
// (short file, absurd header length (> 100 MB), bad JSON, missing or mistyped
// fields, unknown dtype, negative dims, bad or overlapping offsets, gaps,
// sizes that disagree with dtype and shape, truncated data).
Expected<SafetensorsFile> ReadSafetensors(const std::string& path);

// Collects tensors and metadata, then writes them as one file.
//
// Tensors are written in the order they were added: header entries and data
// follow that order, with no padding between tensors. Metadata keys are
// written sorted. Writing the same tensors and metadata twice gives
// byte-identical files. Not thread-safe.
class SafetensorsWriter {
 public:
  // Copies `bytes` bytes from `data` (which may be null only when bytes == 0).
  // InvalidArgument when the name is empty, "__metadata__" or already added,
  // the dtype is unknown, a dim is negative, or bytes != numel * dtype size.
  Status Add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
             const void* data, size_t bytes);
  // Sets (or replaces) one "__metadata__" entry.
  void SetMetadata(const std::string& key, const std::string& value);

  // Writes `path` + ".tmp", fsyncs it, then renames it over `path` (then
  // fsyncs the directory, best effort), so a crash leaves either the old file
  // or the whole new one. IOError naming the path when the OS refuses (e.g. missing directory);
  // the ".tmp" file is removed on failure. May be called more than once.
  Status WriteFile(const std::string& path) const;

  size_t size() const { return tensors_.size(); }

 private:
  std::vector<SafeTensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace troupe
