// Safetensors reader and writer: see safetensors.h for the format.
#include "storage/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>

#include "gpu/tensor.h"  // BF16

namespace troupe {
namespace {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

using Json = nlohmann::ordered_json;  // keeps header order: ties between zero-size tensors stay stable

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the limit Hugging Face's reader uses
constexpr const char* kMetadataKey = "__metadata__";

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// numel * dtype size, or an error naming `what` when it overflows.
Expected<uint64_t> ByteSize(const std::string& what, const std::string& dtype, const std::vector<int64_t>& shape) {
  const uint64_t elem = SafetensorsDTypeSize(dtype);
  if (elem == 0) return Status::InvalidArgument(what + ": unknown dtype '" + dtype + "'");
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return Status::InvalidArgument(what + ": negative dim in shape " + ShapeString(shape));
    if (d != 0 && n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / static_cast<uint64_t>(d))
      return Status::InvalidArgument(what + ": shape " + ShapeString(shape) + " overflows");
    n *= static_cast<uint64_t>(d);
  }
  if (n > std::numeric_limits<uint64_t>::max() / elem)
    return Status::InvalidArgument(what + ": shape " + ShapeString(shape) + " overflows");
  return n * elem;
}

// IEEE half <-> float. Half subnormals go through float arithmetic, which is exact.
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    const float f = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  if (exp == 31) u = sign | 0x7f800000u | (mant << 13);
  else u = sign | ((exp + 112) << 23) | (mant << 13);
  return std::bit_cast<float>(u);
}

uint16_t FloatToHalf(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // rounds to +-inf (65520 and up)
  if (u < 0x38800000u)                          // below 2^-14: half subnormal; nearbyint ties to even
    return sign | static_cast<uint16_t>(std::nearbyint(std::bit_cast<float>(u) * 16777216.0f));
  u -= 112u << 23;  // rebias exponent 127 -> 15
  u += 0xfffu + ((u >> 13) & 1u);
  return sign | static_cast<uint16_t>(u >> 13);
}

bool ReadExact(std::FILE* f, void* dst, size_t n) { return n == 0 || std::fread(dst, 1, n, f) == n; }

bool WriteAll(int fd, const void* src, size_t n) {
  const auto* p = static_cast<const uint8_t*>(src);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// One header entry, validated against itself (not yet against its neighbours).
struct Entry {
  SafeTensor tensor;
  uint64_t begin = 0, end = 0;
};

Expected<Entry> ParseEntry(const std::string& name, const Json& j) {
  const std::string what = "tensor '" + name + "'";
  if (!j.is_object()) return Status::Corruption(what + ": header entry is not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!j.contains(key)) return Status::Corruption(what + ": missing '" + key + "'");
  const Json& dtype = j["dtype"];
  const Json& shape = j["shape"];
  const Json& offsets = j["data_offsets"];
  if (!dtype.is_string()) return Status::Corruption(what + ": 'dtype' is not a string");
  if (!shape.is_array()) return Status::Corruption(what + ": 'shape' is not an array");
  if (!offsets.is_array() || offsets.size() != 2)
    return Status::Corruption(what + ": 'data_offsets' is not an array of two integers");
  Entry e;
  e.tensor.name = name;
  e.tensor.dtype = dtype.get<std::string>();
  if (SafetensorsDTypeSize(e.tensor.dtype) == 0)
    return Status::Corruption(what + ": unknown dtype '" + e.tensor.dtype + "'");
  for (const Json& d : shape) {
    if (!d.is_number_integer()) return Status::Corruption(what + ": 'shape' holds a non-integer");
    if (!d.is_number_unsigned()) return Status::Corruption(what + ": negative dim in 'shape' " + shape.dump());
    const uint64_t v = d.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return Status::Corruption(what + ": dim " + std::to_string(v) + " is too large");
    e.tensor.shape.push_back(static_cast<int64_t>(v));
  }
  for (const Json& o : offsets)
    if (!o.is_number_unsigned()) return Status::Corruption(what + ": 'data_offsets' must be non-negative integers");
  e.begin = offsets[0].get<uint64_t>();
  e.end = offsets[1].get<uint64_t>();
  const std::string span = "[" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
  if (e.end < e.begin) return Status::Corruption(what + ": data_offsets " + span + " end before they begin");
  auto need = ByteSize(what, e.tensor.dtype, e.tensor.shape);
  if (!need.ok()) return Status::Corruption(need.status().message());
  if (e.end - e.begin != need.value())
    return Status::Corruption("mislabelled " + what + ": " + e.tensor.dtype + " " + ShapeString(e.tensor.shape) +
                              " needs " + std::to_string(need.value()) + " bytes but data_offsets " + span +
                              " span " + std::to_string(e.end - e.begin));
  return e;
}

// Parses the header JSON into entries (in file order) and metadata, and checks
// that the entries tile [0, buffer_bytes) exactly.
Status ParseHeader(const std::string& text, uint64_t buffer_bytes, std::vector<Entry>* entries,
                   std::map<std::string, std::string>* metadata) {
  Json header;
  try {
    header = Json::parse(text);
  } catch (const Json::exception& e) {
    return Status::Corruption(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) return Status::Corruption("header is not a JSON object");
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      if (!value.is_object()) return Status::Corruption("'__metadata__' is not an object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) return Status::Corruption("metadata '" + mk + "' is not a string");
        (*metadata)[mk] = mv.get<std::string>();
      }
      continue;
    }
    auto e = ParseEntry(key, value);
    if (!e.ok()) return e.status();
    if (e->end > buffer_bytes)
      return Status::Corruption("tensor '" + key + "' ends at byte " + std::to_string(e->end) +
                                ", beyond the data buffer of " + std::to_string(buffer_bytes) +
                                " bytes (file truncated?)");
    entries->push_back(std::move(e.value()));
  }
  std::stable_sort(entries->begin(), entries->end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  for (size_t i = 0; i < entries->size(); ++i) {
    const Entry& e = (*entries)[i];
    if (e.begin < covered)
      return Status::Corruption("tensors '" + (*entries)[i - 1].tensor.name + "' and '" + e.tensor.name +
                                "' overlap: the second begins at byte " + std::to_string(e.begin) +
                                " before byte " + std::to_string(covered));
    if (e.begin > covered)
      return Status::Corruption("gap in the data buffer: bytes [" + std::to_string(covered) + ", " +
                                std::to_string(e.begin) + ") belong to no tensor");
    covered = e.end;
  }
  if (covered != buffer_bytes)
    return Status::Corruption("trailing bytes: the data buffer holds " + std::to_string(buffer_bytes) +
                              " bytes but the tensors cover " + std::to_string(covered));
  return Status::Ok();
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

}  // namespace

size_t SafetensorsDTypeSize(std::string_view dtype) {
  static const std::map<std::string_view, size_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1},
      {"U16", 2},  {"I16", 2}, {"F16", 2}, {"BF16", 2},    {"U32", 4},     {"I32", 4},
      {"F32", 4},  {"U64", 8}, {"I64", 8}, {"F64", 8}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

int64_t SafeTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Expected<std::vector<float>> DecodeFloats(const SafeTensor& t) {
  const size_t n = static_cast<size_t>(t.numel());
  const size_t elem = SafetensorsDTypeSize(t.dtype);
  if (elem == 0 || t.bytes.size() != n * elem)
    return Status::InvalidArgument("tensor '" + t.name + "': holds " + std::to_string(t.bytes.size()) +
                                   " bytes, not " + std::to_string(n) + " x " + t.dtype);
  std::vector<float> out(n);
  const uint8_t* p = t.bytes.data();
  for (size_t i = 0; i < n; ++i) {
    if (t.dtype == "F32") {
      std::memcpy(&out[i], p + 4 * i, 4);
    } else if (t.dtype == "F64") {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      out[i] = static_cast<float>(d);
    } else if (t.dtype == "BF16" || t.dtype == "F16") {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = t.dtype == "F16" ? HalfToFloat(h) : BF16{h}.ToFloat();
    } else {
      return Status::InvalidArgument("tensor '" + t.name + "': cannot decode dtype " + t.dtype + " as floats");
    }
  }
  return out;
}

Expected<std::vector<uint8_t>> EncodeFloats(const float* data, size_t n, std::string_view dtype) {
  if (dtype != "F32" && dtype != "F64" && dtype != "BF16" && dtype != "F16")
    return Status::InvalidArgument("cannot encode floats as dtype " + std::string(dtype));
  std::vector<uint8_t> out(n * SafetensorsDTypeSize(dtype));
  uint8_t* p = out.data();
  for (size_t i = 0; i < n; ++i) {
    if (dtype == "F32") {
      std::memcpy(p + 4 * i, &data[i], 4);
    } else if (dtype == "F64") {
      const double d = data[i];
      std::memcpy(p + 8 * i, &d, 8);
    } else {
      const uint16_t h = dtype == "F16" ? FloatToHalf(data[i]) : BF16::FromFloat(data[i]).bits;
      std::memcpy(p + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const SafeTensor& t : tensors_) out.push_back(t.name);
  return out;
}

const SafeTensor* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Expected<const SafeTensor*> SafetensorsFile::Get(std::string_view name) const {
  const SafeTensor* t = Find(name);
  if (t == nullptr) return Status::NotFound(path_ + ": no tensor '" + std::string(name) + "'");
  return t;
}

Expected<SafetensorsFile> ReadSafetensors(const std::string& path) {
  auto fail = [&](Status s) { return s.WithContext(path); };
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    const std::string why = std::strerror(errno);
    if (errno == ENOENT) return fail(Status::NotFound("no such file"));
    return fail(Status::IOError("cannot open: " + why));
  }
  struct stat st{};
  if (::fstat(::fileno(f.get()), &st) != 0) return fail(Status::IOError(std::string("fstat: ") + std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) return fail(Status::IOError("not a regular file"));
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8)
    return fail(Status::Corruption("file is only " + std::to_string(file_bytes) +
                                   " bytes, shorter than the 8-byte header length"));
  uint64_t header_bytes = 0;
  if (!ReadExact(f.get(), &header_bytes, 8)) return fail(Status::IOError("cannot read the header length"));
  if (header_bytes > kMaxHeaderBytes)
    return fail(Status::Corruption("header length " + std::to_string(header_bytes) + " is absurd (limit " +
                                   std::to_string(kMaxHeaderBytes) + ")"));
  if (header_bytes > file_bytes - 8)
    return fail(Status::Corruption("header length " + std::to_string(header_bytes) + " is larger than the file (" +
                                   std::to_string(file_bytes) + " bytes; truncated?)"));
  std::string text(header_bytes, '\0');
  if (!ReadExact(f.get(), text.data(), text.size())) return fail(Status::IOError("cannot read the header"));

  SafetensorsFile out;
  out.path_ = path;
  std::vector<Entry> entries;
  TROUPE_RETURN_IF_ERROR(fail(ParseHeader(text, file_bytes - 8 - header_bytes, &entries, &out.metadata_)));
  // The entries tile the buffer in order, so the data is one sequential read.
  try {
    for (Entry& e : entries) {
      e.tensor.bytes.resize(e.end - e.begin);
      if (!ReadExact(f.get(), e.tensor.bytes.data(), e.tensor.bytes.size()))
        return fail(Status::IOError("cannot read tensor '" + e.tensor.name + "'"));
      out.index_[e.tensor.name] = out.tensors_.size();
      out.tensors_.push_back(std::move(e.tensor));
    }
  } catch (const std::bad_alloc&) {
    return fail(Status::OutOfMemory("cannot allocate host memory for the tensors"));
  }
  return out;
}

Status SafetensorsWriter::Add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
                              const void* data, size_t bytes) {
  const std::string what = "safetensors: tensor '" + name + "'";
  if (name.empty() || name == kMetadataKey) return Status::InvalidArgument(what + ": reserved or empty name");
  if (index_.count(name)) return Status::InvalidArgument(what + ": duplicate name");
  auto need = ByteSize(what, dtype, shape);
  if (!need.ok()) return need.status();
  if (need.value() != bytes)
    return Status::InvalidArgument(what + ": " + dtype + " " + ShapeString(shape) + " needs " +
                                   std::to_string(need.value()) + " bytes, got " + std::to_string(bytes));
  if (bytes > 0 && data == nullptr) return Status::InvalidArgument(what + ": null data");
  SafeTensor t{name, dtype, shape, {}};
  const auto* p = static_cast<const uint8_t*>(data);
  t.bytes.assign(p, p + bytes);
  index_[name] = tensors_.size();
  tensors_.push_back(std::move(t));
  return Status::Ok();
}

void SafetensorsWriter::SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

Status SafetensorsWriter::WriteFile(const std::string& path) const {
  Json header = Json::object();
  if (!metadata_.empty()) {
    Json meta = Json::object();
    for (const auto& [k, v] : metadata_) meta[k] = v;  // std::map: sorted, so deterministic
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const SafeTensor& t : tensors_) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const Json::exception& e) {
    return Status::InvalidArgument(path + ": a tensor name or metadata string is not valid UTF-8: " + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
  const uint64_t header_bytes = text.size();

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::IOError(tmp + ": cannot create: " + std::strerror(errno));
  bool ok = WriteAll(fd, &header_bytes, 8) && WriteAll(fd, text.data(), text.size());
  for (size_t i = 0; ok && i < tensors_.size(); ++i) ok = WriteAll(fd, tensors_[i].bytes.data(), tensors_[i].bytes.size());
  ok = ok && ::fsync(fd) == 0;
  const int saved_errno = errno;
  ok = (::close(fd) == 0) && ok;
  if (!ok) {
    ::unlink(tmp.c_str());
    return Status::IOError(tmp + ": write failed: " + std::strerror(saved_errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    return Status::IOError(path + ": cannot rename " + tmp + " into place: " + why);
  }
  // Make the rename itself durable; best effort (some filesystems refuse fsync on directories).
  std::string dir = std::filesystem::path(path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

}  // namespace troupe
