// Checkpoint storage: the shard store (chunks, checksums, listing, drop,
// durability across reopen, reading format 1, damaged chunk files),
// manifests (round trip and every kind of
// malformed input), the catalog (ids, commit, retention, damage), and
// saving/loading whole checkpoints over several stores with replication,
// re-sharded reads, replica fallback and garbage collection.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <unistd.h>

#include <algorithm>
#include <cereal/archives/portable_binary.hpp>
#include <cereal/types/string.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "common/crc32c.h"
#include "rocksdb_keys.h"
#include "storage/checkpoint/catalog.h"
#include "storage/checkpoint/checkpoint_io.h"
#include "storage/checkpoint/manifest.h"
#include "storage/checkpoint/shard_store.h"

namespace troupe::ckpt {
namespace {

namespace fs = std::filesystem;
using testing::RawKeys;
using Bytes = std::vector<uint8_t>;
using json = nlohmann::json;

Bytes RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng() >> 56);
  return b;
}

// The value of an Expected that must be OK (a failed EXPECT and a default value otherwise).
template <typename T>
T V(Expected<T> e) {
  EXPECT_TRUE(e.ok()) << e.status().message();
  return e.ok() ? std::move(e).value() : T{};
}

bool Has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

// The status has `code` and its message contains every needle.
::testing::AssertionResult Fails(const Status& s, StatusCode code, std::initializer_list<std::string> needles) {
  if (s.ok()) return ::testing::AssertionFailure() << "expected an error, got OK";
  if (s.code() != code)
    return ::testing::AssertionFailure() << "wrong code " << static_cast<int>(s.code()) << ": " << s.message();
  for (const std::string& n : needles)
    if (!Has(s.message(), n)) return ::testing::AssertionFailure() << "'" << n << "' not in: " << s.message();
  return ::testing::AssertionSuccess();
}

void RawPut(const std::string& path, const std::string& key, const std::string& value) {
  rocksdb::DB* db = nullptr;
  rocksdb::Options opts;
  rocksdb::Status s = rocksdb::DB::Open(opts, path, &db);
  ASSERT_TRUE(s.ok()) << s.ToString();
  rocksdb::WriteOptions wo;
  wo.sync = true;
  s = db->Put(wo, key, value);
  delete db;
  ASSERT_TRUE(s.ok()) << s.ToString();
}

class CkptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("troupe_ckpt_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "_" +
            std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<ShardStore> OpenStore(const std::string& sub, const std::string& id) {
    auto s = ShardStore::Open((dir_ / sub).string(), id);
    EXPECT_TRUE(s.ok()) << s.status().message();
    return s.ok() ? std::move(s).value() : nullptr;
  }
  std::unique_ptr<Catalog> OpenCatalog() {
    auto c = Catalog::Open(dir_.string());
    EXPECT_TRUE(c.ok()) << c.status().message();
    return c.ok() ? std::move(c).value() : nullptr;
  }

  fs::path dir_;
};

// ---------------------------------------------------------------- ShardStore

using ShardStoreTest = CkptTest;

TEST_F(ShardStoreTest, PutGetRoundTripSmallMultiChunkAndEmpty) {
  auto store = OpenStore("a", "node-a");
  ASSERT_TRUE(store);
  EXPECT_EQ(store->id(), "node-a");
  EXPECT_EQ(store->path(), (dir_ / "a" / "shards").string());
  const Bytes small = RandomBytes(1000, 1);
  const Bytes big = RandomBytes(2 * kChunkBytes + 12345, 2);  // three chunks
  const Bytes exact = RandomBytes(kChunkBytes, 3);            // exactly one chunk
  const Bytes empty;
  struct Case {
    ShardKey key;
    int64_t row_end;
    const Bytes* bytes;
  };
  const std::vector<Case> cases = {{{"ckpt-000001", "w", 0}, 10, &small},
                                   {{"ckpt-000001", "w", 10}, 30, &big},
                                   {{"ckpt-000001", "x", 0}, 1, &exact},
                                   {{"ckpt-000001", "e", 0}, 0, &empty},
                                   {{"ckpt-000002", "w", 0}, 10, &small}};
  for (const Case& c : cases) {
    auto crc = store->Put(c.key, c.row_end, *c.bytes);
    ASSERT_TRUE(crc.ok()) << crc.status().message();
    EXPECT_EQ(*crc, Crc32c(*c.bytes));
  }
  for (const Case& c : cases) {
    auto got = store->Get(c.key);
    ASSERT_TRUE(got.ok()) << got.status().message();
    EXPECT_TRUE(*got == *c.bytes) << c.key.tensor << "@" << c.key.row_begin;
    EXPECT_TRUE(store->Verify(c.key).ok());
  }
  // Neighbours by name or row do not leak into each other.
  EXPECT_TRUE(store->Get({"ckpt-000001", "w", 1}).status().IsNotFound());
  EXPECT_TRUE(Fails(store->Get({"ckpt-000003", "w", 0}).status(), StatusCode::kNotFound, {"ckpt-000003/w"}));

  auto listed = store->List("ckpt-000001");
  ASSERT_TRUE(listed.ok()) << listed.status().message();
  ASSERT_EQ(listed->size(), 4u);
  std::map<std::string, ShardInfo> by;
  for (const ShardInfo& i : *listed) {
    EXPECT_EQ(i.key.checkpoint, "ckpt-000001");
    by[i.key.tensor + "@" + std::to_string(i.key.row_begin)] = i;
  }
  ASSERT_EQ(by.count("w@10"), 1u);
  EXPECT_EQ(by["w@10"].row_end, 30);
  EXPECT_EQ(by["w@10"].bytes, big.size());
  EXPECT_EQ(by["w@10"].crc32c, Crc32c(big));
  EXPECT_EQ(by["w@0"].bytes, small.size());
  EXPECT_EQ(by["e@0"].bytes, 0u);
  EXPECT_EQ(by["e@0"].row_end, 0);
  EXPECT_EQ(by["x@0"].bytes, kChunkBytes);
  auto all = store->List();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 5u);
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000001", "ckpt-000002"}));

  ASSERT_TRUE(store->Drop("ckpt-000001").ok());
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000002"}));
  for (const Case& c : cases) {
    auto got = store->Get(c.key);
    if (c.key.checkpoint == "ckpt-000001") {
      EXPECT_TRUE(got.status().IsNotFound()) << c.key.tensor;
    } else {
      ASSERT_TRUE(got.ok());
      EXPECT_TRUE(*got == *c.bytes);
    }
  }
  EXPECT_TRUE(store->List("ckpt-000001")->empty());
  // Dropping nothing is fine.
  EXPECT_TRUE(store->Drop("ckpt-000009").ok());
  // Everything of ckpt-000001 is gone on disk too, chunks included.
  EXPECT_FALSE(fs::exists(store->chunks_path() + "/ckpt-000001.chunks"));
  EXPECT_TRUE(fs::exists(store->chunks_path() + "/ckpt-000002.chunks"));
  const std::string path = store->path();
  store.reset();
  for (const std::string& k : RawKeys(path)) EXPECT_FALSE(Has(k, "ckpt-000001")) << k;
}

TEST(Crc32cCombine, IsTheCrcOfTheConcatenation) {
  const Bytes all = RandomBytes(3 * 4096 + 77, 21);
  const std::span<const uint8_t> b(all);
  for (size_t cut : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{4096}, all.size() - 1, all.size()}) {
    const auto x = b.first(cut), y = b.subspan(cut);
    EXPECT_EQ(Crc32cCombine(Crc32c(x), Crc32c(y), y.size()), Crc32c(b)) << "cut at " << cut;
  }
  // Three pieces, folded left to right, as a save folds chunks and shards.
  uint32_t crc = 0;
  for (size_t begin = 0; begin < all.size(); begin += 5000) {
    const auto part = b.subspan(begin, std::min<size_t>(5000, all.size() - begin));
    crc = Crc32cCombine(crc, Crc32c(part), part.size());
  }
  EXPECT_EQ(crc, Crc32c(b));
  EXPECT_EQ(Crc32cCombine(0x12345678, 0, 0), 0x12345678u);  // nothing appended
}

TEST_F(ShardStoreTest, DropOfOneIdLeavesIdsItIsAPrefixOf) {
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  const Bytes b = RandomBytes(64, 4);
  for (const std::string id : {"ckpt-1", "ckpt-10", "ckpt-1.5", "ckpt-2"})
    ASSERT_TRUE(store->Put({id, "w", 0}, 1, b).ok());
  // Tensor names that are prefixes of each other stay apart too.
  ASSERT_TRUE(store->Put({"ckpt-2", "w0", 0}, 1, RandomBytes(64, 5)).ok());
  ASSERT_TRUE(store->Put({"ckpt-2", "w.b", 0}, 1, RandomBytes(64, 6)).ok());
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-1", "ckpt-1.5", "ckpt-10", "ckpt-2"}));
  EXPECT_EQ(store->List("ckpt-1")->size(), 1u);
  EXPECT_EQ(store->List("ckpt-2")->size(), 3u);
  ASSERT_TRUE(store->Drop("ckpt-1").ok());
  EXPECT_TRUE(store->Get({"ckpt-1", "w", 0}).status().IsNotFound());
  EXPECT_TRUE(store->Get({"ckpt-10", "w", 0}).ok());
  EXPECT_TRUE(store->Get({"ckpt-1.5", "w", 0}).ok());
  EXPECT_TRUE(V(store->Get({"ckpt-2", "w", 0})) == b);
  EXPECT_TRUE(V(store->Get({"ckpt-2", "w0", 0})) == RandomBytes(64, 5));
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-1.5", "ckpt-10", "ckpt-2"}));
}

TEST_F(ShardStoreTest, BadNamesAndRowsAreRefused) {
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  const Bytes b = RandomBytes(16, 1);
  EXPECT_TRUE(Fails(store->Put({"ckpt/1", "w", 0}, 1, b).status(), StatusCode::kInvalidArgument, {"ckpt/1"}));
  EXPECT_TRUE(Fails(store->Put({"ckpt-1", "layers/w", 0}, 1, b).status(), StatusCode::kInvalidArgument, {"layers/w"}));
  EXPECT_TRUE(store->Put({"", "w", 0}, 1, b).status().IsInvalidArgument());
  EXPECT_TRUE(store->Put({"ckpt-1", "", 0}, 1, b).status().IsInvalidArgument());
  EXPECT_TRUE(store->Put({"ckpt-1", "w", 5}, 4, b).status().IsInvalidArgument());
  EXPECT_TRUE(store->Put({"ckpt-1", "w", -1}, 4, b).status().IsInvalidArgument());
  EXPECT_TRUE(store->Drop("a/b").IsInvalidArgument());
  EXPECT_TRUE(store->Drop("").IsInvalidArgument());
  EXPECT_TRUE(store->Checkpoints().empty());
  auto all = store->List();
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->empty());
}

TEST_F(ShardStoreTest, AFlippedByteIsACorruptionNamingTheShard) {
  auto store = OpenStore("a", "node-a");
  ASSERT_TRUE(store);
  const Bytes big = RandomBytes(kChunkBytes + 777, 7);
  const Bytes small = RandomBytes(24, 8);
  ASSERT_TRUE(store->Put({"ckpt-000004", "layers.0.w", 64}, 128, big).ok());
  ASSERT_TRUE(store->Put({"ckpt-000004", "norm", 0}, 1, small).ok());
  ASSERT_TRUE(store->Put({"ckpt-000004", "other", 0}, 1, small).ok());
  ASSERT_TRUE(store->CorruptForTest({"ckpt-000004", "layers.0.w", 64}).ok());
  ASSERT_TRUE(store->CorruptForTest({"ckpt-000004", "norm", 0}).ok());
  for (const ShardKey& k : {ShardKey{"ckpt-000004", "layers.0.w", 64}, ShardKey{"ckpt-000004", "norm", 0}}) {
    auto got = store->Get(k);
    const std::string name = k.checkpoint + "/" + k.tensor + " rows@" + std::to_string(k.row_begin);
    EXPECT_TRUE(Fails(got.status(), StatusCode::kCorruption, {name, "node-a"}));
    EXPECT_TRUE(Fails(store->Verify(k), StatusCode::kCorruption, {name}));
  }
  EXPECT_TRUE(V(store->Get({"ckpt-000004", "other", 0})) == small);
  // Nothing to corrupt: an empty shard has no chunk, an absent one nothing.
  ASSERT_TRUE(store->Put({"ckpt-000004", "e", 0}, 0, {}).ok());
  EXPECT_TRUE(store->CorruptForTest({"ckpt-000004", "e", 0}).IsNotFound());
  EXPECT_TRUE(store->CorruptForTest({"ckpt-000005", "w", 0}).IsNotFound());
}

// Format 1's shard header (cereal, portable binary), which shard_store.cpp
// still reads; a format 2 header starts with the same fields.
struct RawHeader {
  uint32_t version = 1;
  int64_t row_end = 0;
  uint64_t bytes = 0;
  uint32_t chunks = 0;
  uint32_t crc32c = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(version, row_end, bytes, chunks, crc32c);
  }
};

std::string EncodeHeader(const RawHeader& h) {
  std::ostringstream os;
  {
    cereal::PortableBinaryOutputArchive ar(os);
    ar(h);
  }
  return os.str();
}

TEST_F(ShardStoreTest, DamagedHeadersAreCorruptionNotACrash) {
  std::string path;
  {
    auto store = OpenStore("a", "a");
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->Put({"ckpt-1", "w", 0}, 1, RandomBytes(100, 1)).ok());
    path = store->path();
  }
  // A header that parses but claims 2^64-1 bytes in 0 chunks (the rounding
  // of bytes + kChunkBytes - 1 overflows), one claiming a size its chunk
  // count does not fit, one that is not a header at all, and a missing chunk.
  RawHeader huge;
  huge.bytes = std::numeric_limits<uint64_t>::max();
  huge.chunks = 0;
  RawHeader mismatch;
  mismatch.bytes = 100;
  mismatch.chunks = 3;
  RawHeader lacking;
  lacking.bytes = 2 * kChunkBytes;
  lacking.chunks = 2;
  RawPut(path, "s/ckpt-1/huge/000000000000", EncodeHeader(huge));
  RawPut(path, "s/ckpt-1/mismatch/000000000000", EncodeHeader(mismatch));
  RawPut(path, "s/ckpt-1/junk/000000000000", "xyz");
  RawPut(path, "s/ckpt-1/lacking/000000000000", EncodeHeader(lacking));
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  EXPECT_TRUE(Fails(store->Get({"ckpt-1", "huge", 0}).status(), StatusCode::kCorruption, {"ckpt-1/huge"}));
  EXPECT_TRUE(Fails(store->Get({"ckpt-1", "mismatch", 0}).status(), StatusCode::kCorruption, {"ckpt-1/mismatch"}));
  EXPECT_TRUE(Fails(store->Get({"ckpt-1", "junk", 0}).status(), StatusCode::kCorruption, {"ckpt-1/junk"}));
  EXPECT_TRUE(
      Fails(store->Get({"ckpt-1", "lacking", 0}).status(), StatusCode::kCorruption, {"ckpt-1/lacking", "chunk 0"}));
  EXPECT_TRUE(store->Get({"ckpt-1", "w", 0}).ok());
  EXPECT_TRUE(Fails(store->List("ckpt-1").status(), StatusCode::kCorruption, {"junk"}));
}

// Format 1's chunk value: a RocksDB value under "c/<shard>/<chunk:06>".
struct RawChunkV1 {
  uint32_t crc32c = 0;
  std::string bytes;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(crc32c, bytes);
  }
};

template <typename T>
std::string EncodeRaw(const T& v) {
  std::ostringstream os;
  {
    cereal::PortableBinaryOutputArchive ar(os);
    ar(v);
  }
  return os.str();
}

TEST_F(ShardStoreTest, FormatOneShardsStillLoad) {
  // A two-chunk shard as builds before format 2 wrote it: chunks in RocksDB.
  std::string path;
  {
    auto store = OpenStore("a", "a");
    ASSERT_TRUE(store);
    path = store->path();
  }
  const Bytes bytes = RandomBytes(kChunkBytes + 1000, 31);
  RawHeader h;
  h.row_end = 4;
  h.bytes = bytes.size();
  h.chunks = 2;
  h.crc32c = Crc32c(bytes);
  for (uint32_t i = 0; i < 2; ++i) {
    const auto part = std::span<const uint8_t>(bytes).subspan(i * kChunkBytes, i == 0 ? kChunkBytes : 1000);
    RawChunkV1 c{Crc32c(part), std::string(part.begin(), part.end())};
    RawPut(path, "c/ckpt-000001/w/000000000000/00000" + std::to_string(i), EncodeRaw(c));
  }
  RawPut(path, "s/ckpt-000001/w/000000000000", EncodeHeader(h));
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  uint32_t crc = 0;
  EXPECT_TRUE(V(store->Get({"ckpt-000001", "w", 0}, &crc)) == bytes);
  EXPECT_EQ(crc, Crc32c(bytes));
  auto listed = V(store->List());
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].row_end, 4);
  EXPECT_EQ(listed[0].bytes, bytes.size());
  // A flipped byte in a format 1 chunk is still caught.
  ASSERT_TRUE(store->CorruptForTest({"ckpt-000001", "w", 0}).ok());
  EXPECT_TRUE(Fails(store->Verify({"ckpt-000001", "w", 0}), StatusCode::kCorruption, {"chunk 0", "CRC32C"}));
  // New shards next to old ones are format 2; dropping the id removes both kinds.
  ASSERT_TRUE(store->Put({"ckpt-000001", "w", 4}, 5, RandomBytes(10, 32)).ok());
  EXPECT_EQ(store->Checkpoints(), std::vector<std::string>{"ckpt-000001"});
  ASSERT_TRUE(store->Drop("ckpt-000001").ok());
  EXPECT_TRUE(store->Checkpoints().empty());
  store.reset();
  EXPECT_TRUE(RawKeys(path).empty());
}

TEST_F(ShardStoreTest, AnUnknownFormatVersionIsRefusedByNumber) {
  std::string path;
  {
    auto store = OpenStore("a", "a");
    ASSERT_TRUE(store);
    path = store->path();
  }
  RawHeader future;
  future.version = 3;
  future.bytes = 10;
  future.chunks = 1;
  RawPut(path, "s/ckpt-1/w/000000000000", EncodeHeader(future));
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  EXPECT_TRUE(Fails(store->Get({"ckpt-1", "w", 0}).status(), StatusCode::kCorruption,
                    {"ckpt-1/w", "format version 3", "reads versions 1 and 2"}));
  EXPECT_TRUE(Fails(store->List().status(), StatusCode::kCorruption, {"ckpt-1/w"}));
}

TEST_F(ShardStoreTest, DamagedChunkFilesAreCorruptionNamingTheShard) {
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  const Bytes big = RandomBytes(kChunkBytes + 99, 41), small = RandomBytes(64, 42);
  ASSERT_TRUE(store->Put({"ckpt-1", "small", 0}, 1, small).ok());
  ASSERT_TRUE(store->Put({"ckpt-1", "big", 0}, 2, big).ok());  // written after "small": the file's tail
  ASSERT_TRUE(store->Sync().ok());
  const std::string file = store->chunks_path() + "/ckpt-1.chunks";
  ASSERT_TRUE(fs::exists(file));
  const uintmax_t size = fs::file_size(file);
  EXPECT_EQ(size, 64 + small.size() + big.size());  // a 64-byte file header, then the chunks back to back

  // Cut short: the shard at the end lies past it, the one before it still loads.
  fs::resize_file(file, size - 10);
  EXPECT_TRUE(
      Fails(store->Get({"ckpt-1", "big", 0}).status(), StatusCode::kCorruption, {"ckpt-1/big", "past the end"}));
  EXPECT_TRUE(V(store->Get({"ckpt-1", "small", 0})) == small);
  // Another checkpoint's file (its header names another id), then none at all.
  fs::resize_file(file, size);
  {
    auto other = OpenStore("b", "b");
    ASSERT_TRUE(other);
    ASSERT_TRUE(other->Put({"ckpt-2", "small", 0}, 1, small).ok());
    ASSERT_TRUE(other->Sync().ok());
    fs::copy_file(other->chunks_path() + "/ckpt-2.chunks", file, fs::copy_options::overwrite_existing);
  }
  EXPECT_TRUE(Fails(store->Get({"ckpt-1", "small", 0}).status(), StatusCode::kCorruption,
                    {"ckpt-1/small", "not a version 2 chunk file of ckpt-1"}));
  fs::remove(file);
  EXPECT_TRUE(Fails(store->Get({"ckpt-1", "small", 0}).status(), StatusCode::kCorruption, {"ckpt-1/small", "missing"}));
}

TEST_F(ShardStoreTest, AChunkFileWithoutHeadersBelongsToItsCheckpoint) {
  // A save killed before any of its headers reached the index leaves only
  // its chunk file: Checkpoints() must report the id so GC drops it.
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->Put({"ckpt-000001", "w", 0}, 1, RandomBytes(10, 1)).ok());
  { std::ofstream(store->chunks_path() + "/ckpt-000007.chunks") << "chunk bytes of a crashed save"; }
  { std::ofstream(store->chunks_path() + "/unrelated.txt") << "not a chunk file"; }
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000001", "ckpt-000007"}));
  EXPECT_TRUE(store->Get({"ckpt-000007", "w", 0}).status().IsNotFound());
  ASSERT_TRUE(store->Drop("ckpt-000007").ok());
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000001"}));
  EXPECT_FALSE(fs::exists(store->chunks_path() + "/ckpt-000007.chunks"));
  EXPECT_TRUE(fs::exists(store->chunks_path() + "/unrelated.txt"));
}

TEST_F(ShardStoreTest, ChunksWithoutAHeaderStillBelongToTheirCheckpoint) {
  // A save killed between the chunks of a multi-chunk shard leaves chunks
  // and no header: Checkpoints() must still report the id so GC drops it.
  std::string path;
  {
    auto store = OpenStore("a", "a");
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->Put({"ckpt-000001", "w", 0}, 1, RandomBytes(10, 1)).ok());
    path = store->path();
  }
  RawPut(path, "c/ckpt-000007/w/000000000000/000000", "chunk bytes of a crashed save");
  auto store = OpenStore("a", "a");
  ASSERT_TRUE(store);
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000001", "ckpt-000007"}));
  EXPECT_TRUE(store->Get({"ckpt-000007", "w", 0}).status().IsNotFound());
  ASSERT_TRUE(store->Drop("ckpt-000007").ok());
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000001"}));
  store.reset();
  for (const std::string& k : RawKeys(path)) EXPECT_FALSE(Has(k, "ckpt-000007")) << k;
}

TEST_F(ShardStoreTest, ReopenAfterCloseKeepsSyncedData) {
  const Bytes big = RandomBytes(kChunkBytes + 5, 11);
  const Bytes small = RandomBytes(300, 12);
  {
    auto store = OpenStore("a", "a");
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->Put({"ckpt-000003", "w", 0}, 2, big).ok());
    ASSERT_TRUE(store->Put({"ckpt-000003", "w", 2}, 3, small).ok());
    ASSERT_TRUE(store->Sync().ok());
  }
  auto store = OpenStore("a", "renamed");
  ASSERT_TRUE(store);
  EXPECT_EQ(store->id(), "renamed");
  EXPECT_TRUE(V(store->Get({"ckpt-000003", "w", 0})) == big);
  EXPECT_TRUE(V(store->Get({"ckpt-000003", "w", 2})) == small);
  EXPECT_EQ(store->Checkpoints(), (std::vector<std::string>{"ckpt-000003"}));
  auto listed = store->List("ckpt-000003");
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ((*listed)[0].row_end, 2);
  EXPECT_EQ((*listed)[1].row_end, 3);
}

TEST_F(ShardStoreTest, OpenFailsWithIOErrorNamingThePath) {
  const fs::path file = dir_ / "plainfile";
  { std::ofstream(file) << "x"; }
  auto s = ShardStore::Open(file.string(), "a");
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(s.status().IsIOError()) << s.status().message();
  EXPECT_TRUE(Has(s.status().message(), file.string()));
}

// ------------------------------------------------------------------ Manifest

Manifest SampleManifest() {
  Manifest m;
  m.id = "ckpt-000042";
  m.step = 1234;
  m.phase = "pretrain";
  m.created_unix_ms = 1700000000123;
  m.layout = {2, 4, 8};
  m.replication = 2;
  m.loaders["train"] = {3, 17};
  m.loaders["val"] = {0, 5};
  m.seed = 0xFFFFFFFFFFFFFFF0ull;  // needs all 64 bits
  m.metrics = {{"loss", 2.5}, {"lr", 3e-4}, {"grad_norm", 0.1}};
  m.config_text = "[model]\nhidden_size = 64 # \"quoted\" \\ and unicode: \xc3\xa9\n";
  m.config_hash = ConfigHash(m.config_text);
  m.pinned = true;
  TensorRecord a;
  a.name = "model.layers.0.w";
  a.dtype = "F32";
  a.shape = {10, 4};
  a.bytes = 160;
  a.crc32c = 0xDEADBEEF;
  a.shards = {{0, 3, 1, {"s0", "s1"}}, {3, 6, 2, {"s1", "s2"}}, {6, 10, 3, {"s2", "s0"}}};
  TensorRecord b;
  b.name = "empty";
  b.dtype = "BF16";
  b.shape = {0, 3};
  TensorRecord c;
  c.name = "vec";
  c.dtype = "F32";
  c.shape = {5};
  c.bytes = 20;
  c.shards = {{0, 1, 9, {"s0"}}};
  m.tensors = {a, b, c};
  return m;
}

TEST(Manifest, EncodeDecodeRoundTrip) {
  const Manifest m = SampleManifest();
  auto back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_TRUE(*back == m);
  EXPECT_EQ(back->seed, 0xFFFFFFFFFFFFFFF0ull);
  EXPECT_EQ(back->tensors[0].shards[2].stores, (std::vector<std::string>{"s2", "s0"}));
  // Encoding is a function of the manifest.
  EXPECT_EQ(EncodeManifest(*back), EncodeManifest(m));
  Manifest changed = m;
  changed.tensors[0].shards[1].crc32c ^= 1;
  EXPECT_FALSE(V(DecodeManifest(EncodeManifest(changed))) == m);
  // Helpers.
  EXPECT_EQ(m.TotalBytes(), 180u);
  ASSERT_NE(m.Find("vec"), nullptr);
  EXPECT_EQ(m.Find("vec")->rows(), 1);
  EXPECT_EQ(m.Find("vec")->row_bytes(), 20);
  EXPECT_EQ(m.Find("model.layers.0.w")->rows(), 10);
  EXPECT_EQ(m.Find("model.layers.0.w")->row_bytes(), 16);
  EXPECT_EQ(m.Find("empty")->rows(), 0);
  EXPECT_EQ(m.Find("empty")->row_bytes(), 0);
  EXPECT_EQ(m.Find("nope"), nullptr);
}

TEST(Manifest, NonFiniteMetricsSurviveTheRoundTrip) {
  // JSON has no NaN/inf: a diverging grad_norm must not make the manifest
  // (and with it the whole catalog) unreadable.
  Manifest m = SampleManifest();
  m.metrics["grad_norm"] = std::numeric_limits<double>::infinity();
  m.metrics["neg"] = -std::numeric_limits<double>::infinity();
  m.metrics["val_loss"] = std::numeric_limits<double>::quiet_NaN();
  auto back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->metrics["grad_norm"], std::numeric_limits<double>::infinity());
  EXPECT_EQ(back->metrics["neg"], -std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(back->metrics["val_loss"]));
  EXPECT_EQ(back->metrics["loss"], 2.5);
}

TEST(Manifest, ConfigHashIsTheCrcInEightHexDigits) {
  EXPECT_EQ(ConfigHash("123456789"), "e3069283");
  EXPECT_EQ(ConfigHash(""), "00000000");
  EXPECT_NE(ConfigHash("a = 1"), ConfigHash("a = 2"));
}

// Decodes `m` after `edit` changed its JSON; expects a Corruption with every needle.
::testing::AssertionResult DecodeFails(const std::function<void(json&)>& edit,
                                       std::initializer_list<std::string> needles) {
  json j = json::parse(EncodeManifest(SampleManifest()));
  edit(j);
  return Fails(DecodeManifest(j.dump()).status(), StatusCode::kCorruption, needles);
}

TEST(Manifest, DecodeErrorsNameTheProblem) {
  EXPECT_TRUE(Fails(DecodeManifest("{not json").status(), StatusCode::kCorruption, {"not a JSON object"}));
  EXPECT_TRUE(Fails(DecodeManifest("").status(), StatusCode::kCorruption, {"not a JSON object"}));
  EXPECT_TRUE(Fails(DecodeManifest("[1, 2]").status(), StatusCode::kCorruption, {"not a JSON object"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["format"] = "safetensors"; }, {"format", "safetensors"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j.erase("format"); }, {"'format'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["version"] = 2; }, {"version 2"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["version"] = "1"; }, {"'version'", "wrong type"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j.erase("step"); }, {"'step'", "ckpt-000042"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["step"] = "many"; }, {"'step'", "wrong type"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j.erase("id"); }, {"'id'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["layout"].erase("ep"); }, {"'ep'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["loaders"]["train"].erase("cursor"); }, {"'cursor'", "train"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["loaders"] = 3; }, {"'loaders'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["metrics"]["loss"] = "low"; }, {"loss"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j.erase("config_hash"); }, {"'config_hash'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j.erase("pinned"); }, {"'pinned'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"] = json::object(); }, {"'tensors'"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][1].erase("dtype"); }, {"'dtype'", "empty"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][0].erase("shards"); }, {"'shards'", "model.layers.0.w"}));
  // Shards that do not tile the rows: a gap, an overlap, a short cover, a backwards one.
  EXPECT_TRUE(DecodeFails(
      [](json& j) {
        j["tensors"][0]["shards"][1]["rows"] = {4, 6};
      },
      {"model.layers.0.w", "do not tile", "row 4", "expected 3"}));
  EXPECT_TRUE(DecodeFails(
      [](json& j) {
        j["tensors"][0]["shards"][1]["rows"] = {2, 6};
      },
      {"model.layers.0.w", "do not tile"}));
  EXPECT_TRUE(
      DecodeFails([](json& j) { j["tensors"][0]["shards"].erase(2); }, {"model.layers.0.w", "cover 6 of 10 rows"}));
  EXPECT_TRUE(DecodeFails(
      [](json& j) {
        j["tensors"][0]["shards"][1]["rows"] = {3, 2};
      },
      {"model.layers.0.w", "do not tile"}));
  EXPECT_TRUE(
      DecodeFails([](json& j) { j["tensors"][0]["shards"][1]["rows"] = {3}; }, {"model.layers.0.w", "[begin, end]"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][2]["shards"] = json::array(); }, {"vec", "cover 0 of 1"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][0]["shards"][2]["stores"] = json::array(); },
                          {"model.layers.0.w", "no store"}));
  // The shape and the size.
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][0]["shape"] = {-10, -4}; }, {"model.layers.0.w", "negative"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][0]["bytes"] = 161; }, {"model.layers.0.w", "bytes"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][1]["bytes"] = 8; }, {"empty", "bytes"}));
  EXPECT_TRUE(DecodeFails([](json& j) { j["tensors"][2]["name"] = "empty"; }, {"two tensors", "empty"}));
}

// ------------------------------------------------------------------- Catalog

using CatalogTest = CkptTest;

Manifest Committable(const std::string& id, int64_t step) {
  Manifest m;
  m.id = id;
  m.step = step;
  m.config_text = "x";
  m.config_hash = ConfigHash("x");
  TensorRecord t;
  t.name = "w";
  t.dtype = "F32";
  t.shape = {2, 2};
  t.bytes = 16;
  t.shards = {{0, 2, 7, {"s0"}}};
  m.tensors = {t};
  return m;
}

TEST_F(CatalogTest, ReservedIdsIncreaseAndAreNeverReused) {
  std::vector<std::string> ids;
  {
    auto cat = OpenCatalog();
    ASSERT_TRUE(cat);
    for (int i = 0; i < 3; ++i) ids.push_back(V(cat->ReserveId()));
    ASSERT_TRUE(cat->Commit(Committable(ids[1], 5)).ok());
  }
  {
    auto cat = OpenCatalog();
    ASSERT_TRUE(cat);
    ids.push_back(V(cat->ReserveId()));  // not ckpt-000003 again, though it was never committed
    ASSERT_TRUE(cat->Remove(ids[1]).ok());
  }
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  ids.push_back(V(cat->ReserveId()));  // nor the removed one
  EXPECT_EQ(ids, (std::vector<std::string>{"ckpt-000001", "ckpt-000002", "ckpt-000003", "ckpt-000004", "ckpt-000005"}));
}

TEST_F(CatalogTest, CommitGetListLatest) {
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  EXPECT_TRUE(cat->Latest().status().IsNotFound());
  EXPECT_TRUE(cat->List()->empty());
  const std::string a = V(cat->ReserveId()), b = V(cat->ReserveId()), c = V(cat->ReserveId());
  // Committed out of order; listed by id.
  ASSERT_TRUE(cat->Commit(Committable(c, 30)).ok());
  ASSERT_TRUE(cat->Commit(Committable(a, 10)).ok());
  EXPECT_EQ(cat->Latest()->id, c);
  auto got = cat->Get(a);
  ASSERT_TRUE(got.ok()) << got.status().message();
  EXPECT_TRUE(*got == Committable(a, 10));
  EXPECT_TRUE(Fails(cat->Get(b).status(), StatusCode::kNotFound, {b}));
  auto list = cat->List();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].id, a);
  EXPECT_EQ((*list)[1].id, c);
  EXPECT_EQ((*list)[1].step, 30);
  // Ids past 999 still sort as numbers (fixed width).
  Manifest big = Committable("ckpt-001000", 1000);
  ASSERT_TRUE(cat->Commit(big).ok());
  EXPECT_EQ(cat->Latest()->id, "ckpt-001000");
  EXPECT_EQ(cat->List()->back().id, "ckpt-001000");
}

TEST_F(CatalogTest, MalformedIdsAreInvalidArgument) {
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  for (const std::string bad : {"ckpt-12", "foo", "ckpt-00000x", "ckpt-0000001", "", "CKPT-000001", "ckpt-/0000"}) {
    EXPECT_TRUE(Fails(cat->Get(bad).status(), StatusCode::kInvalidArgument, {"'" + bad + "'"})) << bad;
    EXPECT_TRUE(cat->Commit(Committable(bad, 1)).IsInvalidArgument()) << bad;
    EXPECT_TRUE(cat->SetPinned(bad, true).IsInvalidArgument()) << bad;
    EXPECT_TRUE(cat->Remove(bad).IsInvalidArgument()) << bad;
  }
  EXPECT_TRUE(cat->List()->empty());
}

TEST_F(CatalogTest, PinAndRemove) {
  {
    auto cat = OpenCatalog();
    ASSERT_TRUE(cat);
    ASSERT_TRUE(cat->Commit(Committable("ckpt-000001", 1)).ok());
    ASSERT_TRUE(cat->Commit(Committable("ckpt-000002", 2)).ok());
    EXPECT_FALSE(cat->Get("ckpt-000001")->pinned);
    ASSERT_TRUE(cat->SetPinned("ckpt-000001", true).ok());
    EXPECT_TRUE(Fails(cat->SetPinned("ckpt-000003", true), StatusCode::kNotFound, {"ckpt-000003"}));
  }
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  EXPECT_TRUE(cat->Get("ckpt-000001")->pinned);  // durable
  EXPECT_FALSE(cat->Get("ckpt-000002")->pinned);
  // Pinning changes nothing else.
  Manifest expect = Committable("ckpt-000001", 1);
  expect.pinned = true;
  EXPECT_TRUE(V(cat->Get("ckpt-000001")) == expect);
  ASSERT_TRUE(cat->SetPinned("ckpt-000001", false).ok());
  EXPECT_FALSE(cat->Get("ckpt-000001")->pinned);
  ASSERT_TRUE(cat->Remove("ckpt-000002").ok());
  EXPECT_TRUE(cat->Get("ckpt-000002").status().IsNotFound());
  EXPECT_TRUE(Fails(cat->Remove("ckpt-000002"), StatusCode::kNotFound, {"ckpt-000002"}));
  EXPECT_EQ(cat->Latest()->id, "ckpt-000001");
  EXPECT_EQ(cat->List()->size(), 1u);
}

TEST_F(CatalogTest, ExpiredFollowsKeepLastKeepEveryAndPins) {
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  // ckpt-000001..7 at steps 10..70.
  for (int i = 1; i <= 7; ++i) {
    const std::string id = V(cat->ReserveId());
    ASSERT_TRUE(cat->Commit(Committable(id, 10 * i)).ok());
  }
  ASSERT_TRUE(cat->SetPinned("ckpt-000002", true).ok());  // step 20
  auto ex = [&](int keep_last, int64_t keep_every) {
    auto e = cat->Expired({keep_last, keep_every});
    EXPECT_TRUE(e.ok()) << e.status().message();
    return e.ok() ? *e : std::vector<std::string>{"error"};
  };
  // keep the newest 2 (60, 70), steps % 30 == 0 (30, 60), the pin (20).
  EXPECT_EQ(ex(2, 30), (std::vector<std::string>{"ckpt-000001", "ckpt-000004", "ckpt-000005"}));
  EXPECT_EQ(ex(1, 0),
            (std::vector<std::string>{"ckpt-000001", "ckpt-000003", "ckpt-000004", "ckpt-000005", "ckpt-000006"}));
  EXPECT_EQ(ex(0, 0), (std::vector<std::string>{"ckpt-000001", "ckpt-000003", "ckpt-000004", "ckpt-000005",
                                                "ckpt-000006", "ckpt-000007"}));
  EXPECT_EQ(ex(0, 20), (std::vector<std::string>{"ckpt-000001", "ckpt-000003", "ckpt-000005", "ckpt-000007"}));
  EXPECT_TRUE(ex(7, 0).empty());
  EXPECT_TRUE(ex(100, 0).empty());
  EXPECT_EQ(ex(6, 0), (std::vector<std::string>{"ckpt-000001"}));
  // Expired() only reports; nothing is removed.
  EXPECT_EQ(cat->List()->size(), 7u);
}

TEST_F(CatalogTest, ADamagedManifestIsACorruptionNamingTheKey) {
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  ASSERT_TRUE(cat->Commit(Committable("ckpt-000001", 1)).ok());
  ASSERT_TRUE(cat->Commit(Committable("ckpt-000002", 2)).ok());
  ASSERT_TRUE(cat->PutRawForTest("ckpt-000002", "{\"format\": \"troupe.checkpoint\", \"version\": 1").ok());
  EXPECT_TRUE(Fails(cat->Get("ckpt-000002").status(), StatusCode::kCorruption, {"m/ckpt-000002"}));
  EXPECT_TRUE(Fails(cat->List().status(), StatusCode::kCorruption, {"m/ckpt-000002"}));
  EXPECT_TRUE(Fails(cat->Latest().status(), StatusCode::kCorruption, {"m/ckpt-000002"}));
  EXPECT_TRUE(cat->Expired({1, 0}).status().IsCorruption());
  EXPECT_TRUE(cat->Get("ckpt-000001").ok());  // the others still read
  // A sound manifest under the wrong key is damage too, for Get and for List.
  ASSERT_TRUE(cat->PutRawForTest("ckpt-000002", EncodeManifest(Committable("ckpt-000001", 1))).ok());
  EXPECT_TRUE(Fails(cat->Get("ckpt-000002").status(), StatusCode::kCorruption, {"m/ckpt-000002", "ckpt-000001"}));
  EXPECT_TRUE(Fails(cat->List().status(), StatusCode::kCorruption, {"m/ckpt-000002", "ckpt-000001"}));
  // Repaired by a proper commit.
  ASSERT_TRUE(cat->Commit(Committable("ckpt-000002", 2)).ok());
  EXPECT_EQ(cat->List()->size(), 2u);
}

TEST_F(CatalogTest, TheLastIdIsExhaustionNotCorruption) {
  { ASSERT_TRUE(OpenCatalog()); }
  RawPut((dir_ / "catalog").string(), "next_seq", "999999");
  auto cat = OpenCatalog();
  ASSERT_TRUE(cat);
  EXPECT_EQ(V(cat->ReserveId()), "ckpt-999999");
  auto next = cat->ReserveId();
  EXPECT_TRUE(Fails(next.status(), StatusCode::kInternal, {"exhausted"}));
  cat.reset();
  RawPut((dir_ / "catalog").string(), "next_seq", "12x");
  cat = OpenCatalog();
  EXPECT_TRUE(Fails(cat->ReserveId().status(), StatusCode::kCorruption, {"12x"}));
}

// ---------------------------------------------------- Save / load / GC

class CheckpointIoTest : public CkptTest {
 protected:
  void SetUp() override {
    CkptTest::SetUp();
    Open();
  }
  void Open() {
    catalog_ = OpenCatalog();
    ASSERT_TRUE(catalog_);
    stores_.clear();
    set_.clear();
    for (int i = 0; i < 3; ++i) {
      stores_.push_back(OpenStore("store-" + std::to_string(i), "s" + std::to_string(i)));
      ASSERT_TRUE(stores_.back());
      set_[stores_.back()->id()] = stores_.back().get();
    }
  }
  void Close() {
    set_.clear();
    stores_.clear();
    catalog_.reset();
  }

  static HostTensor Tensor(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                           uint64_t seed) {
    const size_t elem = dtype == "F32" ? 4 : 2;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return {name, dtype, std::move(shape), RandomBytes(static_cast<size_t>(n) * elem, seed)};
  }

  static Snapshot Sample(int64_t step, uint64_t salt = 0) {
    Snapshot s;
    s.step = step;
    s.phase = "pretrain";
    s.layout = {1, 2, 1};
    s.loaders["train"] = {2, 40};
    s.loaders["val"] = {0, 3};
    s.seed = 99;
    s.metrics = {{"loss", 3.25}, {"lr", 1e-3}};
    s.config_text = "[train]\nsteps = 10\n";
    s.tensors = {Tensor("vec", "F32", {1000}, 1 + salt),         // 1-D: one row
                 Tensor("mat", "F32", {37, 24}, 2 + salt),       // 2-D
                 Tensor("cube", "BF16", {5, 7, 6}, 3 + salt),    // 3-D: 35 rows
                 Tensor("few", "F32", {2, 16}, 4 + salt),        // fewer rows than shards
                 Tensor("empty", "F32", {0, 8}, 5 + salt),       // no rows at all
                 Tensor("empty1d", "F32", {0}, 6 + salt),        // one row of 0 bytes
                 Tensor("scalar", "F32", {}, 7 + salt),          // one element
                 Tensor("big", "F32", {2, 1048600}, 8 + salt)};  // rows just over kChunkBytes: 2 chunks per shard
    return s;
  }

  Expected<Manifest> Save(const Snapshot& s, int replication = 2, int shards = 3) {
    return SaveCheckpoint(s, set_, *catalog_, {replication, shards});
  }

  std::unique_ptr<Catalog> catalog_;
  std::vector<std::unique_ptr<ShardStore>> stores_;
  StoreSet set_;
};

void ExpectSameSnapshot(const Snapshot& a, const Snapshot& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.phase, b.phase);
  EXPECT_TRUE(a.layout == b.layout);
  EXPECT_TRUE(a.loaders == b.loaders);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.metrics, b.metrics);
  EXPECT_EQ(a.config_text, b.config_text);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].name, b.tensors[i].name);
    EXPECT_EQ(a.tensors[i].dtype, b.tensors[i].dtype);
    EXPECT_EQ(a.tensors[i].shape, b.tensors[i].shape);
    EXPECT_TRUE(a.tensors[i].bytes == b.tensors[i].bytes) << a.tensors[i].name;
  }
}

TEST_F(CheckpointIoTest, SaveThenLoadGivesIdenticalBytes) {
  const Snapshot snap = Sample(7);
  auto m = Save(snap);
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->id, "ckpt-000001");
  EXPECT_EQ(m->step, 7);
  EXPECT_EQ(m->replication, 2);
  EXPECT_EQ(m->config_hash, ConfigHash(snap.config_text));
  EXPECT_EQ(m->TotalBytes(), snap.TotalBytes());
  // The committed manifest is what Save returned.
  auto committed = catalog_->Get(m->id);
  ASSERT_TRUE(committed.ok());
  EXPECT_TRUE(*committed == *m);
  // Shard layout: min(3, rows) pieces, as equal as the rows allow, two distinct stores each.
  const std::map<std::string, int> want = {{"vec", 1},   {"mat", 3},     {"cube", 3},   {"few", 2},
                                           {"empty", 0}, {"empty1d", 1}, {"scalar", 1}, {"big", 2}};
  std::set<std::string> used;
  int total_shards = 0;
  for (const TensorRecord& t : m->tensors) {
    EXPECT_EQ(static_cast<int>(t.shards.size()), want.at(t.name)) << t.name;
    for (const ShardRef& s : t.shards) {
      ASSERT_EQ(s.stores.size(), 2u);
      EXPECT_NE(s.stores[0], s.stores[1]);
      used.insert(s.stores.begin(), s.stores.end());
      const int64_t pieces = std::min<int64_t>(3, t.rows()), n = s.row_end - s.row_begin;
      EXPECT_TRUE(n == t.rows() / pieces || n == (t.rows() + pieces - 1) / pieces) << t.name << " " << n;
      ++total_shards;
    }
  }
  EXPECT_EQ(m->Find("mat")->shards[1].row_begin, 12);
  EXPECT_EQ(m->Find("mat")->shards[1].row_end, 24);
  EXPECT_EQ(used.size(), 3u);  // spread over every store
  for (auto& st : stores_) EXPECT_EQ(st->Checkpoints(), (std::vector<std::string>{"ckpt-000001"}));

  ReadStats stats;
  auto back = LoadCheckpoint(*m, set_, &stats);
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSameSnapshot(snap, *back);
  EXPECT_EQ(stats.shards_read, total_shards);
  EXPECT_EQ(stats.replica_fallbacks, 0);
  EXPECT_TRUE(stats.failures.empty());
  std::vector<std::string> problems;
  EXPECT_TRUE(VerifyCheckpoint(*m, set_, &problems).ok());
  EXPECT_TRUE(problems.empty());

  // And from disk, after closing everything.
  Close();
  Open();
  auto latest = catalog_->Latest();
  ASSERT_TRUE(latest.ok());
  auto again = LoadCheckpoint(*latest, set_);
  ASSERT_TRUE(again.ok()) << again.status().message();
  ExpectSameSnapshot(snap, *again);
}

TEST_F(CheckpointIoTest, ParallelWritersGiveTheSameCheckpoint) {
  // The manifest (shard layout, stores, checksums) does not depend on how
  // many threads wrote the shards; tensor CRCs, folded from the shards',
  // are the CRCs of the tensors' bytes.
  const Snapshot snap = Sample(3);
  std::vector<Manifest> saved;
  for (int threads : {1, 2, 5}) {
    SaveOptions opts{2, 3};
    opts.threads = threads;
    auto m = SaveCheckpoint(snap, set_, *catalog_, opts);
    ASSERT_TRUE(m.ok()) << m.status().message();
    saved.push_back(*m);
    auto back = LoadCheckpoint(*m, set_);
    ASSERT_TRUE(back.ok()) << back.status().message();
    ExpectSameSnapshot(snap, *back);
  }
  for (size_t i = 0; i < snap.tensors.size(); ++i) {
    const HostTensor& h = snap.tensors[i];
    EXPECT_EQ(saved[0].tensors[i].crc32c, Crc32c(h.bytes)) << h.name;
    for (const Manifest& m : saved) EXPECT_TRUE(m.tensors[i] == saved[0].tensors[i]) << h.name << " in " << m.id;
  }
  SaveOptions none{2, 3};
  none.threads = 0;
  EXPECT_TRUE(Fails(SaveCheckpoint(snap, set_, *catalog_, none).status(), StatusCode::kInvalidArgument, {"threads"}));
}

TEST(StagingPool, HandsBackBuffersOfTheSizeAskedAndKeepsOneSnapshot) {
  StagingPool pool;
  EXPECT_EQ(pool.Take(100).size(), 100u);  // empty pool: a new buffer
  Snapshot s;
  s.tensors = {{"a", "F32", {25}, Bytes(100, 1)}, {"b", "F32", {2}, Bytes(8, 2)}};
  const uint8_t* a = s.tensors[0].bytes.data();
  pool.Recycle(std::move(s));
  EXPECT_EQ(pool.bytes_kept(), 108u);
  Bytes got = pool.Take(100);
  EXPECT_EQ(got.data(), a);  // the same memory, not a copy
  EXPECT_EQ(got.size(), 100u);
  EXPECT_EQ(pool.bytes_kept(), 8u);
  EXPECT_EQ(pool.Take(50).size(), 50u);  // no buffer of that size: a new one
  EXPECT_EQ(pool.bytes_kept(), 8u);
  // A second snapshot replaces what the first left: one snapshot's buffers at most.
  Snapshot t;
  t.tensors = {{"c", "F32", {4}, Bytes(16, 3)}};
  pool.Recycle(std::move(t));
  EXPECT_EQ(pool.bytes_kept(), 16u);
  EXPECT_EQ(pool.Take(8).size(), 8u);
  EXPECT_EQ(pool.bytes_kept(), 16u);
  pool.Clear();
  EXPECT_EQ(pool.bytes_kept(), 0u);
}

TEST_F(CheckpointIoTest, ReadRowsOfAnyRangeIsTheSlice) {
  const Snapshot snap = Sample(1);
  auto m = Save(snap);
  ASSERT_TRUE(m.ok()) << m.status().message();
  for (const HostTensor& h : snap.tensors) {
    const TensorRecord* t = m->Find(h.name);
    ASSERT_NE(t, nullptr);
    const int64_t rows = t->rows(), rb = t->row_bytes();
    // Every range [a, b) of the small tensors, and a sample of the big one.
    for (int64_t a = 0; a <= rows; ++a) {
      for (int64_t b = a; b <= rows; ++b) {
        if (h.name == "big" && !(a == 0 || b == rows || b == a + 1)) continue;
        auto got = ReadRows(*t, m->id, a, b, set_);
        ASSERT_TRUE(got.ok()) << h.name << " [" << a << ", " << b << "): " << got.status().message();
        ASSERT_EQ(static_cast<int64_t>(got->size()), (b - a) * rb) << h.name;
        ASSERT_TRUE(std::equal(got->begin(), got->end(), h.bytes.begin() + a * rb))
            << h.name << " [" << a << ", " << b << ")";
      }
    }
  }
  // Restoring into another layout: saved as 3 pieces, read back as 4 or 5.
  const TensorRecord* mat = m->Find("mat");
  for (const std::vector<int64_t>& cuts : {std::vector<int64_t>{0, 10, 19, 28, 37}, {0, 7, 15, 22, 30, 37}}) {
    Bytes joined;
    ReadStats stats;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      auto part = ReadRows(*mat, m->id, cuts[i], cuts[i + 1], set_, &stats);
      ASSERT_TRUE(part.ok()) << part.status().message();
      joined.insert(joined.end(), part->begin(), part->end());
    }
    EXPECT_TRUE(joined == snap.tensors[1].bytes);
    EXPECT_GT(stats.shards_read, 3);  // ranges crossing a shard boundary read both shards
  }
  // Outside the tensor.
  EXPECT_TRUE(Fails(ReadRows(*mat, m->id, 30, 38, set_).status(), StatusCode::kInvalidArgument, {"mat", "38"}));
  EXPECT_TRUE(ReadRows(*mat, m->id, -1, 3, set_).status().IsInvalidArgument());
  EXPECT_TRUE(ReadRows(*mat, m->id, 5, 4, set_).status().IsInvalidArgument());
  // A manifest whose shards leave a gap is caught, not padded or truncated silently.
  TensorRecord gappy = *mat;
  gappy.shards.erase(gappy.shards.begin() + 1);
  EXPECT_TRUE(Fails(ReadRows(gappy, m->id, 0, 37, set_).status(), StatusCode::kCorruption, {"mat"}));
}

TEST_F(CheckpointIoTest, OneBadReplicaIsServedByTheOther) {
  const Snapshot snap = Sample(3);
  auto m = Save(snap);
  ASSERT_TRUE(m.ok()) << m.status().message();
  const TensorRecord* mat = m->Find("mat");
  const ShardRef& ref = mat->shards[1];
  ASSERT_TRUE(set_.at(ref.stores[0])->CorruptForTest({m->id, "mat", ref.row_begin}).ok());
  // Also corrupt a multi-chunk shard's first replica.
  const ShardRef& big = m->Find("big")->shards[0];
  ASSERT_TRUE(set_.at(big.stores[0])->CorruptForTest({m->id, "big", big.row_begin}).ok());

  ReadStats stats;
  auto back = LoadCheckpoint(*m, set_, &stats);
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSameSnapshot(snap, *back);
  EXPECT_EQ(stats.replica_fallbacks, 2);
  ASSERT_EQ(stats.failures.size(), 2u);
  EXPECT_TRUE(Has(stats.failures[0] + stats.failures[1], m->id + "/mat rows@" + std::to_string(ref.row_begin)));

  std::vector<std::string> problems;
  EXPECT_TRUE(VerifyCheckpoint(*m, set_, &problems).ok());
  ASSERT_EQ(problems.size(), 2u);
  const std::string all = problems[0] + "\n" + problems[1];
  EXPECT_TRUE(
      Has(all, "shard store " + ref.stores[0] + ": shard " + m->id + "/mat rows@" + std::to_string(ref.row_begin)))
      << all;
  EXPECT_TRUE(Has(all, m->id + "/big rows@0")) << all;

  // Both copies bad: the load fails naming the tensor; Verify agrees.
  ASSERT_TRUE(set_.at(ref.stores[1])->CorruptForTest({m->id, "mat", ref.row_begin}).ok());
  auto broken = LoadCheckpoint(*m, set_);
  EXPECT_TRUE(Fails(broken.status(), StatusCode::kCorruption, {"tensor mat", m->id}));
  problems.clear();
  EXPECT_TRUE(Fails(VerifyCheckpoint(*m, set_, &problems), StatusCode::kCorruption, {m->id, "1 shard"}));
  EXPECT_EQ(problems.size(), 3u);
  // Other tensors still read.
  auto cube = ReadRows(*m->Find("cube"), m->id, 0, 35, set_);
  ASSERT_TRUE(cube.ok());
  EXPECT_TRUE(*cube == snap.tensors[2].bytes);
}

TEST_F(CheckpointIoTest, AMissingStoreFallsBackToTheOtherReplica) {
  const Snapshot snap = Sample(4);
  auto m = Save(snap);
  ASSERT_TRUE(m.ok()) << m.status().message();
  for (const std::string gone : {"s0", "s1", "s2"}) {
    StoreSet partial = set_;
    partial.erase(gone);
    ReadStats stats;
    auto back = LoadCheckpoint(*m, partial, &stats);
    ASSERT_TRUE(back.ok()) << gone << ": " << back.status().message();
    ExpectSameSnapshot(snap, *back);
    EXPECT_GT(stats.replica_fallbacks, 0) << gone;
    EXPECT_TRUE(Has(stats.failures.at(0), gone)) << stats.failures.at(0);
    std::vector<std::string> problems;
    EXPECT_TRUE(VerifyCheckpoint(*m, partial, &problems).ok());
    EXPECT_FALSE(problems.empty());
    for (const std::string& p : problems) EXPECT_TRUE(Has(p, gone)) << p;
  }
  // With two of three stores gone some shard has no copy left.
  StoreSet one = {{"s0", set_.at("s0")}};
  EXPECT_TRUE(Fails(LoadCheckpoint(*m, one).status(), StatusCode::kNotFound, {"every copy", "not available"}));
  EXPECT_TRUE(VerifyCheckpoint(*m, one, nullptr).IsCorruption());
}

TEST_F(CheckpointIoTest, AReplicaThatDiffersFromTheManifestIsBad) {
  // Sound on its own (its own CRC matches) but not what the manifest recorded.
  const Snapshot snap = Sample(5);
  auto m = Save(snap, 2, 1);
  ASSERT_TRUE(m.ok()) << m.status().message();
  const ShardRef& ref = m->Find("few")->shards[0];
  ASSERT_TRUE(set_.at(ref.stores[0])->Put({m->id, "few", 0}, 2, RandomBytes(128, 77)).ok());
  ReadStats stats;
  auto back = LoadCheckpoint(*m, set_, &stats);
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSameSnapshot(snap, *back);
  EXPECT_EQ(stats.replica_fallbacks, 1);
  std::vector<std::string> problems;
  EXPECT_TRUE(VerifyCheckpoint(*m, set_, &problems).ok());
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_TRUE(Has(problems[0], ref.stores[0]) && Has(problems[0], "few") && Has(problems[0], "manifest"))
      << problems[0];
}

TEST_F(CheckpointIoTest, BadSaveRequestsWriteNothing) {
  const Snapshot snap = Sample(1);
  EXPECT_TRUE(Fails(Save(snap, 4).status(), StatusCode::kInvalidArgument, {"replication 4", "3"}));
  EXPECT_TRUE(Save(snap, 0).status().IsInvalidArgument());
  EXPECT_TRUE(Save(snap, 1, 0).status().IsInvalidArgument());
  EXPECT_TRUE(SaveCheckpoint(snap, {}, *catalog_, {1, 1}).status().IsInvalidArgument());
  Snapshot dup = snap;
  dup.tensors.push_back(Tensor("mat", "F32", {2, 2}, 50));
  EXPECT_TRUE(Fails(Save(dup).status(), StatusCode::kInvalidArgument, {"mat"}));
  Snapshot odd = snap;
  odd.tensors.back().bytes.pop_back();
  EXPECT_TRUE(Fails(Save(odd).status(), StatusCode::kInvalidArgument, {"big", "bytes"}));
  Snapshot slash = snap;
  slash.tensors[0].name = "a/b";
  EXPECT_TRUE(Fails(Save(slash).status(), StatusCode::kInvalidArgument, {"a/b"}));
  // Nothing committed, nothing written, and no id used up.
  EXPECT_TRUE(catalog_->List()->empty());
  for (auto& st : stores_) EXPECT_TRUE(st->Checkpoints().empty()) << st->id();
  EXPECT_EQ(V(catalog_->ReserveId()), "ckpt-000001");
}

TEST_F(CheckpointIoTest, UncommittedShardsAreInvisibleAndCollected) {
  const Snapshot snap = Sample(10);
  auto committed = Save(snap);
  ASSERT_TRUE(committed.ok()) << committed.status().message();
  // A save that crashed before its commit: an id reserved, shards written
  // (one of them only as a headerless chunk would be), no manifest.
  const std::string crashed = V(catalog_->ReserveId());
  ASSERT_TRUE(stores_[0]->Put({crashed, "mat", 0}, 12, RandomBytes(12 * 24 * 4, 1)).ok());
  ASSERT_TRUE(stores_[1]->Put({crashed, "mat", 0}, 12, RandomBytes(12 * 24 * 4, 1)).ok());
  // A save running right now (passed as `keep`) must not lose its shards.
  const std::string running = V(catalog_->ReserveId());
  ASSERT_TRUE(stores_[2]->Put({running, "vec", 0}, 1, RandomBytes(4000, 2)).ok());

  auto list = catalog_->List();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].id, committed->id);
  EXPECT_TRUE(catalog_->Get(crashed).status().IsNotFound());
  EXPECT_EQ(catalog_->Latest()->id, committed->id);

  auto dropped = CollectGarbage(*catalog_, set_, {1 << 30, 0}, running);
  ASSERT_TRUE(dropped.ok()) << dropped.status().message();
  EXPECT_EQ(*dropped, std::vector<std::string>{crashed});
  EXPECT_EQ(stores_[0]->Checkpoints(), std::vector<std::string>{committed->id});
  EXPECT_EQ(stores_[1]->Checkpoints(), std::vector<std::string>{committed->id});
  EXPECT_EQ(stores_[2]->Checkpoints(), (std::vector<std::string>{committed->id, running}));
  auto back = LoadCheckpoint(*committed, set_);
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSameSnapshot(snap, *back);
  // Once it is no longer running, it goes too.
  dropped = CollectGarbage(*catalog_, set_, {1 << 30, 0});
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, std::vector<std::string>{running});
  EXPECT_EQ(stores_[2]->Checkpoints(), std::vector<std::string>{committed->id});
  // A further pass has nothing to do.
  EXPECT_TRUE(CollectGarbage(*catalog_, set_, {1 << 30, 0})->empty());
  EXPECT_TRUE(LoadCheckpoint(*committed, set_).ok());
}

TEST_F(CheckpointIoTest, RetentionRemovesExpiredManifestsAndShardsButKeepsPins) {
  std::vector<Manifest> saved;
  std::vector<Snapshot> snaps;
  for (int i = 1; i <= 5; ++i) {
    snaps.push_back(Sample(10 * i, static_cast<uint64_t>(i) * 100));
    snaps.back().tensors.pop_back();  // keep it small: no "big"
    auto m = Save(snaps.back());
    ASSERT_TRUE(m.ok()) << m.status().message();
    saved.push_back(*m);
  }
  ASSERT_TRUE(catalog_->SetPinned(saved[1].id, true).ok());
  auto dropped = CollectGarbage(*catalog_, set_, {2, 0});
  ASSERT_TRUE(dropped.ok()) << dropped.status().message();
  EXPECT_EQ(*dropped, (std::vector<std::string>{saved[0].id, saved[2].id}));
  std::vector<std::string> ids;
  for (const Manifest& m : V(catalog_->List())) ids.push_back(m.id);
  EXPECT_EQ(ids, (std::vector<std::string>{saved[1].id, saved[3].id, saved[4].id}));
  for (auto& st : stores_) EXPECT_EQ(st->Checkpoints(), ids) << st->id();
  for (int i : {1, 3, 4}) {
    auto m = catalog_->Get(saved[i].id);
    ASSERT_TRUE(m.ok());
    auto back = LoadCheckpoint(*m, set_);
    ASSERT_TRUE(back.ok()) << back.status().message();
    ExpectSameSnapshot(snaps[i], *back);
  }
  // keep_every keeps milestones: of steps 20 (pinned), 40, 50 with keep_last 1
  // and keep_every 40, nothing more goes; with keep_every 0, step 40 goes.
  EXPECT_TRUE(CollectGarbage(*catalog_, set_, {1, 40})->empty());
  EXPECT_EQ(V(CollectGarbage(*catalog_, set_, {1, 0})), std::vector<std::string>{saved[3].id});
  EXPECT_TRUE(catalog_->Get(saved[3].id).status().IsNotFound());
  for (auto& st : stores_) EXPECT_EQ(st->Checkpoints(), (std::vector<std::string>{saved[1].id, saved[4].id}));
}

TEST_F(CheckpointIoTest, SingleStoreNoReplication) {
  StoreSet one = {{"s1", set_.at("s1")}};
  const Snapshot snap = Sample(2);
  auto m = SaveCheckpoint(snap, one, *catalog_, {1, 4});
  ASSERT_TRUE(m.ok()) << m.status().message();
  for (const TensorRecord& t : m->tensors)
    for (const ShardRef& s : t.shards) EXPECT_EQ(s.stores, std::vector<std::string>{"s1"});
  EXPECT_EQ(m->Find("mat")->shards.size(), 4u);
  auto back = LoadCheckpoint(*m, one);
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSameSnapshot(snap, *back);
  EXPECT_TRUE(stores_[0]->Checkpoints().empty());
}

}  // namespace
}  // namespace troupe::ckpt
