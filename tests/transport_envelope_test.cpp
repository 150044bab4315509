// Envelope, CRC32C, codec and key-file tests: round trips, and every kind of
// hostile input gives Status::Corruption (never a crash).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cereal/types/map.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "actors/transport/codec.h"
#include "common/crc32c.h"
#include "actors/transport/envelope.h"
#include "actors/transport/keys.h"
#include "actors/transport/messages.h"

namespace troupe::transport {
namespace {

std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

void PutU32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

// ------------------------------- CRC32C -----------------------------------

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(Crc32c(Bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(Crc32cPortable(Bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(Crc32c({}), 0u);
  std::vector<uint8_t> zeros(32, 0);  // RFC 3720 B.4
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);
  std::vector<uint8_t> ff(32, 0xFF);
  EXPECT_EQ(Crc32c(ff), 0x62A8AB43u);
}

TEST(Crc32c, FastPathMatchesPortableAndExtends) {
  std::mt19937 rng(7);
  for (size_t n : {0, 1, 7, 8, 9, 63, 64, 1000, 4097}) {
    std::vector<uint8_t> b(n);
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    EXPECT_EQ(Crc32c(b), Crc32cPortable(b)) << n;
    const size_t half = n / 2;
    std::span<const uint8_t> s(b);
    EXPECT_EQ(Crc32c(s.subspan(half), Crc32c(s.first(half))), Crc32c(b)) << n;
  }
}

// ------------------------------- Envelope ---------------------------------

TEST(Envelope, RoundTrip) {
  for (size_t n : {0, 1, 15, 16, 17, 4096}) {
    std::vector<uint8_t> payload(n);
    for (size_t i = 0; i < n; ++i) payload[i] = static_cast<uint8_t>(i * 31 + 5);
    const auto bytes = EncodeFrame(777, payload);
    ASSERT_EQ(bytes.size(), kFrameHeaderBytes + n);
    auto f = DecodeFrame(bytes);
    ASSERT_TRUE(f.ok()) << f.status().message();
    EXPECT_EQ(f->type, 777);
    EXPECT_EQ(f->payload, payload);
    // Two-part form, as on the socket.
    auto g = DecodeFrameParts(std::span(bytes).first(kFrameHeaderBytes), std::span(bytes).subspan(kFrameHeaderBytes));
    ASSERT_TRUE(g.ok()) << g.status().message();
    EXPECT_EQ(g->payload, payload);
  }
}

TEST(Envelope, LittleEndianLayout) {
  const auto b = EncodeFrame(0x0102, Bytes("abc"));
  const std::vector<uint8_t> head(b.begin(), b.begin() + 12);
  EXPECT_EQ(head, (std::vector<uint8_t>{0x45, 0x50, 0x52, 0x54, 1, 0, 0x02, 0x01, 3, 0, 0, 0}));
  uint32_t crc;
  std::memcpy(&crc, b.data() + 12, 4);
  EXPECT_EQ(crc, Crc32c(Bytes("abc")));
}

// Expects Corruption whose message contains `what`.
void ExpectCorrupt(std::span<const uint8_t> bytes, const std::string& what) {
  auto f = DecodeFrame(bytes);
  ASSERT_FALSE(f.ok());
  EXPECT_TRUE(f.status().IsCorruption()) << f.status().message();
  EXPECT_NE(f.status().message().find(what), std::string::npos) << f.status().message();
}

TEST(Envelope, TruncatedHeader) {
  const auto b = EncodeFrame(1, Bytes("hello"));
  for (size_t n = 0; n < kFrameHeaderBytes; ++n) ExpectCorrupt(std::span(b).first(n), "truncated header");
}

TEST(Envelope, BadMagic) {
  auto b = EncodeFrame(1, Bytes("hello"));
  b[0] ^= 1;
  ExpectCorrupt(b, "bad magic");
}

TEST(Envelope, WrongVersion) {
  auto b = EncodeFrame(1, Bytes("hello"));
  b[4] = 2;
  ExpectCorrupt(b, "unsupported protocol version 2");
  b[4] = 0;
  ExpectCorrupt(b, "unsupported protocol version 0");
}

TEST(Envelope, LengthTooLargeOrSmall) {
  auto b = EncodeFrame(1, Bytes("hello"));
  PutU32(b, 8, 6);  // header claims more than there is
  ExpectCorrupt(b, "length mismatch");
  PutU32(b, 8, 4);  // header claims less
  ExpectCorrupt(b, "length mismatch");
  PutU32(b, 8, kMaxPayloadBytes + 1);  // over the cap: refused before reading
  ExpectCorrupt(b, "too large");
  PutU32(b, 8, 0xFFFFFFFFu);
  ExpectCorrupt(b, "too large");
  auto c = EncodeFrame(1, Bytes("hello"));
  c.push_back(0);  // trailing byte
  ExpectCorrupt(c, "length mismatch");
  c.resize(c.size() - 3);  // truncated payload
  ExpectCorrupt(c, "length mismatch");
}

TEST(Envelope, CrcMismatch) {
  auto b = EncodeFrame(1, Bytes("hello"));
  b[12] ^= 0x80;
  ExpectCorrupt(b, "checksum mismatch");
}

TEST(Envelope, EveryFlippedBitIsDetected) {
  const auto good = EncodeFrame(9, Bytes("the quick brown fox"));
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto b = good;
      b[i] ^= static_cast<uint8_t>(1u << bit);
      auto f = DecodeFrame(b);
      if (i == 6 || i == 7) {  // the type field is not covered by the CRC
        EXPECT_TRUE(f.ok());
        continue;
      }
      ASSERT_FALSE(f.ok()) << "byte " << i << " bit " << bit;
      EXPECT_TRUE(f.status().IsCorruption());
    }
  }
}

TEST(Envelope, RandomGarbageNeverCrashes) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<uint8_t> b(rng() % 64);
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    if (b.size() >= 4 && trial % 2) PutU32(b, 0, kFrameMagic);  // get past the magic check
    if (b.size() >= 6 && trial % 4 == 1) b[4] = 1, b[5] = 0;
    auto f = DecodeFrame(b);
    EXPECT_FALSE(f.ok());
  }
}

// -------------------------------- Codec -----------------------------------

struct Sample {
  uint32_t id = 0;
  std::string name;
  std::vector<float> weights;
  std::map<std::string, int64_t> counters;
  std::optional<double> lr;
  bool operator==(const Sample&) const = default;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(id, name, weights, counters, lr);
  }
};

TEST(Codec, RoundTripStruct) {
  Sample s{42, "node-3", {1.5f, -2.0f, 3.25f}, {{"steps", 1000}, {"tokens", -7}}, 3e-4};
  const auto bytes = Serialize(s);
  auto back = Deserialize<Sample>(bytes);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back.value(), s);
}

TEST(Codec, RoundTripProtocolMessages) {
  Hello h{1, "node-0", "abc123", 4242};
  auto hb = Deserialize<Hello>(Serialize(h));
  ASSERT_TRUE(hb.ok());
  EXPECT_EQ(hb->node_name, "node-0");
  EXPECT_EQ(hb->pid, 4242u);
  ErrorReply e{3, "bad"};
  auto eb = Deserialize<ErrorReply>(Serialize(e));
  ASSERT_TRUE(eb.ok());
  EXPECT_EQ(eb->message, "bad");
}

TEST(Codec, HostileBytesAreCorruption) {
  const auto good = Serialize(Sample{1, "abc", {1, 2}, {{"x", 1}}, std::nullopt});
  // Every truncation.
  for (size_t n = 0; n < good.size(); ++n) {
    auto r = Deserialize<Sample>(std::span(good).first(n));
    ASSERT_FALSE(r.ok()) << n;
    EXPECT_TRUE(r.status().IsCorruption());
  }
  // Trailing bytes.
  auto longer = good;
  longer.push_back(0);
  auto r = Deserialize<Sample>(longer);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("trailing"), std::string::npos);
  // A huge container length must be refused before anything is allocated.
  std::vector<uint8_t> huge = {1, 0, 0, 0, 0};       // endianness + id
  for (int i = 0; i < 8; ++i) huge.push_back(0xFF);  // name length 2^64-1
  auto h = Deserialize<Sample>(huge);
  ASSERT_FALSE(h.ok());
  EXPECT_TRUE(h.status().IsCorruption());
  EXPECT_NE(h.status().message().find("exceeds"), std::string::npos) << h.status().message();
  // Bad endianness byte.
  auto bad = good;
  bad[0] = 7;
  EXPECT_TRUE(Deserialize<Sample>(bad).status().IsCorruption());
  // Random garbage.
  std::mt19937 rng(3);
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<uint8_t> b(rng() % 48);
    for (auto& x : b) x = static_cast<uint8_t>(rng() % 4 ? rng() % 8 : rng());  // mostly small lengths
    if (!b.empty()) b[0] = 1;
    (void)Deserialize<Sample>(b);  // ok or Corruption: must not crash
  }
}

// -------------------------------- Keys ------------------------------------

class KeysTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("troupe_keys_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  void Write(const std::string& name, const std::string& text) { std::ofstream(Path(name)) << text; }
  std::filesystem::path dir_;
};

TEST_F(KeysTest, GenerateWriteRead) {
  auto kp = GenerateKeyPair();
  ASSERT_TRUE(kp.ok()) << kp.status().message();
  EXPECT_EQ(kp->public_key.size(), 40u);
  EXPECT_EQ(kp->secret_key.size(), 40u);
  EXPECT_TRUE(ValidateKeyPair(kp.value()).ok());
  ASSERT_TRUE(WriteKeyPair(Path("node.key"), kp.value()).ok());
  struct stat st {};
  ASSERT_EQ(::stat(Path("node.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto back = ReadKeyPair(Path("node.key"));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->public_key, kp->public_key);
  EXPECT_EQ(back->secret_key, kp->secret_key);
  ASSERT_TRUE(WritePublicKey(Path("node.pub"), kp->public_key).ok());
  auto pub = ReadPublicKey(Path("node.pub"));
  ASSERT_TRUE(pub.ok()) << pub.status().message();
  EXPECT_EQ(pub.value(), kp->public_key);
  auto pub2 = ReadPublicKey(Path("node.key"));  // public half of a keypair file
  ASSERT_TRUE(pub2.ok());
  EXPECT_EQ(pub2.value(), kp->public_key);
}

TEST_F(KeysTest, ClearErrors) {
  EXPECT_TRUE(ReadKeyPair(Path("missing.key")).status().IsNotFound());
  Write("empty.key", "");
  EXPECT_TRUE(ReadKeyPair(Path("empty.key")).status().IsCorruption());
  Write("magic.key", "not a key file\n");
  auto m = ReadKeyPair(Path("magic.key"));
  EXPECT_TRUE(m.status().IsCorruption());
  EXPECT_NE(m.status().message().find("magic.key:1"), std::string::npos) << m.status().message();
  auto a = GenerateKeyPair().value();
  auto b = GenerateKeyPair().value();
  Write("short.key", "troupe-curve-keypair 1\npublic abc\nsecret " + a.secret_key + "\n");
  auto s = ReadKeyPair(Path("short.key"));
  EXPECT_TRUE(s.status().IsCorruption());
  EXPECT_NE(s.status().message().find("short.key:2"), std::string::npos) << s.status().message();
  Write("mismatch.key", "troupe-curve-keypair 1\npublic " + b.public_key + "\nsecret " + a.secret_key + "\n");
  auto mm = ReadKeyPair(Path("mismatch.key"));
  EXPECT_TRUE(mm.status().IsCorruption());
  EXPECT_NE(mm.status().message().find("does not match"), std::string::npos) << mm.status().message();
  Write("nosecret.key", "troupe-curve-keypair 1\npublic " + a.public_key + "\n");
  EXPECT_TRUE(ReadKeyPair(Path("nosecret.key")).status().IsCorruption());
  EXPECT_FALSE(WriteKeyPair(Path("x.key"), KeyPair{b.public_key, a.secret_key}).ok());
  EXPECT_FALSE(WriteKeyPair(Path("no/such/dir/x.key"), a).ok());
}

TEST_F(KeysTest, AllowList) {
  auto a = GenerateKeyPair().value();
  auto b = GenerateKeyPair().value();
  Write("allow", "# cluster nodes\n\n  " + a.public_key + "   # node-0\n" + b.public_key + "\n" + a.public_key + "\n");
  auto keys = ReadAllowList(Path("allow"));
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  EXPECT_EQ(keys.value(), (std::vector<std::string>{a.public_key, b.public_key}));
  Write("bad", "# ok\n" + a.public_key + "\nnot-a-key\n");
  auto bad = ReadAllowList(Path("bad"));
  EXPECT_TRUE(bad.status().IsCorruption());
  EXPECT_NE(bad.status().message().find("bad:3"), std::string::npos) << bad.status().message();
  ASSERT_TRUE(WriteAllowList(Path("written"), {b.public_key}).ok());
  EXPECT_EQ(ReadAllowList(Path("written")).value(), std::vector<std::string>{b.public_key});
  EXPECT_TRUE(ReadAllowList(Path("nope")).status().IsNotFound());
}

}  // namespace
}  // namespace troupe::transport
