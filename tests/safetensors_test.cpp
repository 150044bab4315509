// Safetensors reader/writer: round trips, determinism, the writer's checks,
// and one test per kind of corruption (a good file, damaged, must give a
// non-OK Status naming the file and the problem -- never a crash).
#include "storage/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <numbers>
#include <nlohmann/json.hpp>

namespace troupe {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using Bytes = std::vector<uint8_t>;

Bytes ReadBytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

void WriteBytes(const fs::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

template <typename T>
Bytes AsBytes(const std::vector<T>& v) {
  Bytes b(v.size() * sizeof(T));
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// A file's header JSON and data buffer, and the inverse (pads like the writer).
std::pair<Json, Bytes> Split(const Bytes& file) {
  uint64_t n;
  std::memcpy(&n, file.data(), 8);
  return {Json::parse(file.begin() + 8, file.begin() + 8 + static_cast<int64_t>(n)),
          Bytes(file.begin() + 8 + static_cast<int64_t>(n), file.end())};
}

Bytes Join(const std::string& header_text, const Bytes& data) {
  std::string text = header_text;
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t n = text.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  out += text;
  out.append(data.begin(), data.end());
  return Bytes(out.begin(), out.end());
}

struct Expect {
  std::string dtype;
  std::vector<int64_t> shape;
  Bytes bytes;
};

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("troupe_st_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // Several dtypes and ranks, a zero-size tensor and a scalar, in this order.
    std::vector<float> w(6);
    for (size_t i = 0; i < w.size(); ++i) w[i] = 0.5f * static_cast<float>(i) - 1.25f;
    const float b_vals[4] = {1.0f, -2.5f, 3.0e20f, -0.0f};
    const float h_vals[3] = {1.0f, 65504.0f, -6.1035156e-05f};
    good_ = {{"model.layers.0.w", {"F32", {2, 3}, AsBytes(w)}},
             {"b", {"BF16", {4}, EncodeFloats(b_vals, 4, "BF16").value()}},
             {"empty", {"F32", {0, 5}, {}}},
             {"step", {"I64", {}, AsBytes(std::vector<int64_t>{-1234567890123})}},
             {"h", {"F16", {1, 3}, EncodeFloats(h_vals, 3, "F16").value()}},
             {"d", {"F64", {2}, AsBytes(std::vector<double>{std::numbers::pi, -1e300})}},
             {"tokens", {"U8", {5}, {1, 2, 3, 250, 255}}},
             {"idx", {"I32", {2, 1}, AsBytes(std::vector<int32_t>{7, -7})}}};
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path Path(const std::string& name) const { return dir_ / name; }

  Status WriteGood(const fs::path& p) const {
    SafetensorsWriter w;
    for (const auto& [name, t] : good_)
      TROUPE_RETURN_IF_ERROR(w.Add(name, t.dtype, t.shape, t.bytes.data(), t.bytes.size()));
    w.SetMetadata("format", "pt");
    w.SetMetadata("step", "42");
    return w.WriteFile(p.string());
  }

  Bytes GoodBytes() const {
    EXPECT_TRUE(WriteGood(Path("good.safetensors")).ok());
    return ReadBytes(Path("good.safetensors"));
  }

  // Writes `bytes`, reads them back, and checks the read fails as Corruption
  // with a message naming the path and containing `problem`.
  void ExpectCorrupt(const Bytes& bytes, const std::string& problem) const {
    const fs::path p = Path("bad.safetensors");
    WriteBytes(p, bytes);
    auto r = ReadSafetensors(p.string());
    ASSERT_FALSE(r.ok()) << "accepted a file that should fail with: " << problem;
    EXPECT_TRUE(r.status().IsCorruption()) << r.status().message();
    EXPECT_NE(r.status().message().find(p.string()), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find(problem), std::string::npos) << r.status().message();
  }

  // Damages the good file's header with `edit`, keeping its data buffer.
  void ExpectHeaderEditRejected(const std::function<void(Json&)>& edit, const std::string& problem) const {
    auto [header, data] = Split(GoodBytes());
    edit(header);
    ExpectCorrupt(Join(header.dump(), data), problem);
  }

  fs::path dir_;
  std::vector<std::pair<std::string, Expect>> good_;
};

TEST_F(SafetensorsTest, RoundTripIsBitwiseAndKeepsOrderAndMetadata) {
  ASSERT_TRUE(WriteGood(Path("a.safetensors")).ok());
  auto r = ReadSafetensors(Path("a.safetensors").string());
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(r->tensors().size(), good_.size());
  for (size_t i = 0; i < good_.size(); ++i) {
    const auto& [name, want] = good_[i];
    EXPECT_EQ(r->names()[i], name);
    const SafeTensor* t = r->Find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->dtype, want.dtype) << name;
    EXPECT_EQ(t->shape, want.shape) << name;
    EXPECT_EQ(t->bytes, want.bytes) << name;
  }
  EXPECT_EQ(r->Find("empty")->numel(), 0);
  EXPECT_EQ(r->Find("step")->numel(), 1);
  EXPECT_EQ(r->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"step", "42"}}));
  EXPECT_EQ(r->Find("nope"), nullptr);
  auto missing = r->Get("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(missing.status().IsNotFound());
  EXPECT_NE(missing.status().message().find("nope"), std::string::npos);
}

TEST_F(SafetensorsTest, WritingTwiceIsByteIdenticalAndAligned) {
  ASSERT_TRUE(WriteGood(Path("a.safetensors")).ok());
  ASSERT_TRUE(WriteGood(Path("b.safetensors")).ok());
  const Bytes a = ReadBytes(Path("a.safetensors")), b = ReadBytes(Path("b.safetensors"));
  EXPECT_EQ(a, b);
  uint64_t n;
  std::memcpy(&n, a.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(a[8], '{');
  EXPECT_FALSE(fs::exists(Path("a.safetensors.tmp")));
}

TEST_F(SafetensorsTest, EmptyWriterGivesAReadableFile) {
  ASSERT_TRUE(SafetensorsWriter().WriteFile(Path("e.safetensors").string()).ok());
  auto r = ReadSafetensors(Path("e.safetensors").string());
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->tensors().empty());
}

TEST_F(SafetensorsTest, WriteFileReplacesAnExistingFile) {
  WriteBytes(Path("a.safetensors"), Bytes(1000, 0xAB));
  ASSERT_TRUE(WriteGood(Path("a.safetensors")).ok());
  EXPECT_TRUE(ReadSafetensors(Path("a.safetensors").string()).ok());
}

TEST_F(SafetensorsTest, FloatHelpersConvertExactly) {
  const std::vector<float> v = {0.0f, 1.0f, -2.0f, 0.1f, 65504.0f, 65520.0f, 5.9604645e-08f, 1e-10f};
  // F16 bit patterns from IEEE 754: 0.1 rounds to 0x2e66, 65520 to +inf, 2^-24 is the least subnormal.
  const std::vector<uint16_t> f16 = {0x0000, 0x3c00, 0xc000, 0x2e66, 0x7bff, 0x7c00, 0x0001, 0x0000};
  auto enc = EncodeFloats(v.data(), v.size(), "F16");
  ASSERT_TRUE(enc.ok());
  EXPECT_EQ(enc.value(), AsBytes(f16));
  for (const char* dtype : {"F32", "F64", "BF16"}) {
    auto e = EncodeFloats(v.data(), v.size(), dtype);
    ASSERT_TRUE(e.ok());
    auto d = DecodeFloats(SafeTensor{"x", dtype, {static_cast<int64_t>(v.size())}, e.value()});
    ASSERT_TRUE(d.ok()) << d.status().message();
    for (size_t i = 0; i < v.size(); ++i) {
      // F32/F64 are exact; BF16 keeps 8 significant bits (relative error <= 2^-9).
      const float tol = std::string(dtype) == "BF16" ? std::abs(v[i]) / 512 : 0.0f;
      EXPECT_NEAR(d.value()[i], v[i], tol) << dtype << " " << i;
    }
  }
  auto h = DecodeFloats(SafeTensor{"h", "F16", {3}, AsBytes(std::vector<uint16_t>{0x3c00, 0x0001, 0xfc00})});
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h.value()[0], 1.0f);
  EXPECT_EQ(h.value()[1], std::ldexp(1.0f, -24));
  EXPECT_EQ(h.value()[2], -std::numeric_limits<float>::infinity());
  EXPECT_FALSE(DecodeFloats(SafeTensor{"i", "I32", {1}, Bytes(4)}).ok());
  EXPECT_FALSE(DecodeFloats(SafeTensor{"s", "F32", {2}, Bytes(4)}).ok());
  EXPECT_FALSE(EncodeFloats(v.data(), v.size(), "I32").ok());
}

TEST_F(SafetensorsTest, WriterRejectsSizeMismatch) {
  SafetensorsWriter w;
  const Bytes eight(8);
  Status s = w.Add("x", "F32", {3}, eight.data(), eight.size());
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("needs 12 bytes, got 8"), std::string::npos) << s.message();
  EXPECT_FALSE(w.Add("x", "F64", {2, 1}, eight.data(), 4).ok());
  EXPECT_FALSE(w.Add("x", "F32", {-2}, eight.data(), 8).ok());
  EXPECT_FALSE(w.Add("x", "Q7", {2}, eight.data(), 8).ok());
  EXPECT_FALSE(w.Add("x", "F32", {2}, nullptr, 8).ok());
  EXPECT_FALSE(w.Add("__metadata__", "F32", {2}, eight.data(), 8).ok());
  EXPECT_EQ(w.size(), 0u);
}

TEST_F(SafetensorsTest, WriterRejectsDuplicateNames) {
  SafetensorsWriter w;
  const Bytes eight(8);
  ASSERT_TRUE(w.Add("x", "F32", {2}, eight.data(), 8).ok());
  Status s = w.Add("x", "U8", {8}, eight.data(), 8);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("duplicate"), std::string::npos) << s.message();
  EXPECT_EQ(w.size(), 1u);
}

TEST_F(SafetensorsTest, WriteIntoMissingDirectoryFailsCleanly) {
  const fs::path p = Path("no/such/dir/x.safetensors");
  Status s = WriteGood(p);
  EXPECT_TRUE(s.IsIOError()) << s.message();
  EXPECT_NE(s.message().find(p.string()), std::string::npos) << s.message();
  EXPECT_FALSE(fs::exists(p));
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  auto r = ReadSafetensors(Path("absent.safetensors").string());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound());
  EXPECT_NE(r.status().message().find("absent.safetensors"), std::string::npos);
}

TEST_F(SafetensorsTest, ShorterThanEightBytes) {
  const Bytes good = GoodBytes();
  for (size_t len : {0, 1, 7}) ExpectCorrupt(Bytes(good.begin(), good.begin() + len), "shorter than the 8-byte");
}

TEST_F(SafetensorsTest, TruncatedInsideHeader) {
  const Bytes good = GoodBytes();
  uint64_t n;
  std::memcpy(&n, good.data(), 8);
  for (uint64_t len : {uint64_t{8}, 8 + n / 2, 8 + n - 1})
    ExpectCorrupt(Bytes(good.begin(), good.begin() + static_cast<int64_t>(len)), "larger than the file");
}

TEST_F(SafetensorsTest, TruncatedInsideData) {
  const Bytes good = GoodBytes();
  uint64_t n;
  std::memcpy(&n, good.data(), 8);
  const size_t data = 8 + n;
  for (size_t len : {data, data + 1, (data + good.size()) / 2, good.size() - 1})
    ExpectCorrupt(Bytes(good.begin(), good.begin() + static_cast<int64_t>(len)), "file truncated");
}

TEST_F(SafetensorsTest, AbsurdHeaderLength) {
  Bytes bad = GoodBytes();
  const uint64_t n = uint64_t{1} << 40;
  std::memcpy(bad.data(), &n, 8);
  ExpectCorrupt(bad, "is absurd");
}

TEST_F(SafetensorsTest, HeaderNotValidJson) {
  Bytes bad = GoodBytes();
  bad[8] = '#';  // the opening brace
  ExpectCorrupt(bad, "not valid JSON");
}

TEST_F(SafetensorsTest, HeaderNotAnObject) {
  auto [header, data] = Split(GoodBytes());
  ExpectCorrupt(Join("[1, 2, 3]", data), "not a JSON object");
}

TEST_F(SafetensorsTest, EntryMissingDtype) {
  ExpectHeaderEditRejected([](Json& h) { h["b"].erase("dtype"); }, "tensor 'b': missing 'dtype'");
}

TEST_F(SafetensorsTest, EntryMissingShape) {
  ExpectHeaderEditRejected([](Json& h) { h["b"].erase("shape"); }, "missing 'shape'");
}

TEST_F(SafetensorsTest, EntryMissingDataOffsets) {
  ExpectHeaderEditRejected([](Json& h) { h["b"].erase("data_offsets"); }, "missing 'data_offsets'");
}

TEST_F(SafetensorsTest, EntryWithWrongJsonTypes) {
  ExpectHeaderEditRejected([](Json& h) { h["b"] = 3; }, "not an object");
  ExpectHeaderEditRejected([](Json& h) { h["b"]["dtype"] = 16; }, "'dtype' is not a string");
  ExpectHeaderEditRejected([](Json& h) { h["b"]["shape"] = "4"; }, "'shape' is not an array");
  ExpectHeaderEditRejected([](Json& h) { h["b"]["shape"] = {4.0}; }, "non-integer");
  ExpectHeaderEditRejected([](Json& h) { h["b"]["data_offsets"] = {24}; }, "array of two integers");
  ExpectHeaderEditRejected([](Json& h) { h["b"]["data_offsets"][0] = "24"; }, "non-negative integers");
  ExpectHeaderEditRejected([](Json& h) { h["__metadata__"]["step"] = 42; }, "metadata 'step' is not a string");
}

TEST_F(SafetensorsTest, UnknownDtype) {
  Bytes bad = GoodBytes();
  const std::string s(bad.begin(), bad.end());
  const size_t at = s.find("\"BF16\"");
  ASSERT_NE(at, std::string::npos);
  std::memcpy(bad.data() + at, "\"XF16\"", 6);  // same length: offsets unchanged
  ExpectCorrupt(bad, "unknown dtype 'XF16'");
}

TEST_F(SafetensorsTest, ChangedDtypeIsMislabelled) {
  Bytes bad = GoodBytes();
  const std::string s(bad.begin(), bad.end());
  const size_t at = s.find("\"F32\"");  // model.layers.0.w, the first tensor
  ASSERT_NE(at, std::string::npos);
  std::memcpy(bad.data() + at, "\"F64\"", 5);
  ExpectCorrupt(bad, "mislabelled tensor 'model.layers.0.w'");
}

TEST_F(SafetensorsTest, ChangedShapeIsMislabelled) {
  ExpectHeaderEditRejected([](Json& h) { h["model.layers.0.w"]["shape"] = {3, 3}; }, "mislabelled");
  ExpectHeaderEditRejected([](Json& h) { h["empty"]["shape"] = {1, 5}; }, "mislabelled tensor 'empty'");
}

TEST_F(SafetensorsTest, NegativeDim) {
  ExpectHeaderEditRejected([](Json& h) { h["model.layers.0.w"]["shape"] = {-2, -3}; }, "negative dim");
}

TEST_F(SafetensorsTest, OffsetsEndBeforeBegin) {
  ExpectHeaderEditRejected(
      [](Json& h) {
        const uint64_t b = h["b"]["data_offsets"][0], e = h["b"]["data_offsets"][1];
        h["b"]["data_offsets"] = {e, b};
      },
      "end before they begin");
}

TEST_F(SafetensorsTest, OffsetsBeyondBuffer) {
  // Correctly sized, but moved past the end of the data.
  ExpectHeaderEditRejected(
      [](Json& h) {
        const uint64_t b = h["idx"]["data_offsets"][0], e = h["idx"]["data_offsets"][1];
        h["idx"]["data_offsets"] = {b + 64, e + 64};
      },
      "beyond the data buffer");
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  ExpectHeaderEditRejected(
      [](Json& h) {
        const uint64_t b = h["b"]["data_offsets"][0], e = h["b"]["data_offsets"][1];
        h["b"]["data_offsets"] = {b - 4, e - 4};
      },
      "overlap");
}

TEST_F(SafetensorsTest, GapInBuffer) {
  ExpectHeaderEditRejected([](Json& h) { h.erase("model.layers.0.w"); }, "gap in the data buffer");
}

TEST_F(SafetensorsTest, TrailingBytes) {
  Bytes bad = GoodBytes();
  bad.insert(bad.end(), 8, 0);
  ExpectCorrupt(bad, "trailing bytes");
}

// No length and no single-byte change of the header may crash the reader.
TEST_F(SafetensorsTest, EveryTruncationAndHeaderByteFlipFailsCleanly) {
  const Bytes good = GoodBytes();
  const fs::path p = Path("fuzz.safetensors");
  for (size_t len = 0; len < good.size(); ++len) {
    WriteBytes(p, Bytes(good.begin(), good.begin() + static_cast<int64_t>(len)));
    auto r = ReadSafetensors(p.string());
    ASSERT_FALSE(r.ok()) << "truncated to " << len;
    EXPECT_NE(r.status().message().find(p.string()), std::string::npos);
  }
  uint64_t n;
  std::memcpy(&n, good.data(), 8);
  for (size_t i = 0; i < 8 + n; ++i) {
    for (uint8_t mask : {0x01, 0x80}) {  // 0x80 also makes invalid UTF-8
      Bytes bad = good;
      bad[i] ^= mask;
      WriteBytes(p, bad);
      auto r = ReadSafetensors(p.string());  // may succeed (e.g. a changed name); must not crash
      if (!r.ok()) {
        EXPECT_FALSE(r.status().message().empty());
      }
    }
  }
}

}  // namespace
}  // namespace troupe
