// Checkpoints written by many writers (storage/checkpoint/checkpoint_io.h:
// WritePieces, AssembleTensors) and read-only shard stores: pieces that
// tile a tensor assemble into the tensor a single writer would have saved
// (same CRC32C, readable by LoadCheckpoint); gaps, overlaps, disagreeing
// copies and unknown tensors are refused by name; a read-only store reads
// what a writer left and refuses to change it, and two can read at once.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "common/crc32c.h"
#include "storage/checkpoint/catalog.h"
#include "storage/checkpoint/checkpoint_io.h"
#include "storage/checkpoint/shard_store.h"
#include "test_util.h"

namespace troupe::ckpt {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng() >> 56);
  return b;
}

Bytes Slice(const Bytes& b, size_t begin, size_t end) { return Bytes(b.begin() + begin, b.begin() + end); }

std::unique_ptr<ShardStore> OpenStore(const std::filesystem::path& dir, const std::string& id) {
  auto s = ShardStore::Open(dir.string(), id);
  EXPECT_TRUE(s.ok()) << s.status().message();
  return s.ok() ? std::move(s).value() : nullptr;
}

bool Has(const Status& s, const std::string& needle) { return s.message().find(needle) != std::string::npos; }

// A [6, 4] F32 tensor written by two writers as rows [0, 2) and [2, 6), plus
// a second copy of rows [2, 6) on a third store.
TEST(CheckpointPieces, TiledPiecesAssembleIntoTheWholeTensor) {
  testing::TempDir dir;
  auto a = OpenStore(dir.path() / "a", "a"), b = OpenStore(dir.path() / "b", "b"), c = OpenStore(dir.path() / "c", "c");
  const Bytes whole = RandomBytes(96, 7), bias = RandomBytes(12, 8);
  const std::vector<int64_t> shape = {6, 4};
  auto ra =
      WritePieces({{"w", "F32", shape, 0, 2, Slice(whole, 0, 32)}, {"bias", "F32", {3}, 0, 1, bias}}, "ckpt-1", *a);
  auto rb = WritePieces({{"w", "F32", shape, 2, 6, Slice(whole, 32, 96)}}, "ckpt-1", *b);
  auto rc = WritePieces({{"w", "F32", shape, 2, 6, Slice(whole, 32, 96)}}, "ckpt-1", *c);
  ASSERT_TRUE(ra.ok() && rb.ok() && rc.ok()) << ra.status().message() << rb.status().message();
  std::vector<PieceRecord> all = *ra;
  all.insert(all.end(), rb->begin(), rb->end());
  all.insert(all.end(), rc->begin(), rc->end());
  auto tensors = AssembleTensors(all, {"w", "bias"});
  ASSERT_TRUE(tensors.ok()) << tensors.status().message();
  ASSERT_EQ(tensors->size(), 2u);
  const TensorRecord& w = (*tensors)[0];
  EXPECT_EQ(w.name, "w");
  EXPECT_EQ(w.bytes, 96u);
  EXPECT_EQ(w.crc32c, Crc32c(whole)) << "the combined CRC is the whole tensor's";
  ASSERT_EQ(w.shards.size(), 2u);
  EXPECT_EQ(w.shards[1].stores, (std::vector<std::string>{"b", "c"})) << "copies of the same rows merge";
  EXPECT_EQ((*tensors)[1].crc32c, Crc32c(bias));

  // What the catalog would commit loads like any checkpoint.
  Manifest m;
  m.id = "ckpt-1";
  m.tensors = *tensors;
  StoreSet stores = {{"a", a.get()}, {"b", b.get()}, {"c", c.get()}};
  auto snap = LoadCheckpoint(m, stores);
  ASSERT_TRUE(snap.ok()) << snap.status().message();
  EXPECT_EQ(snap->tensors[0].bytes, whole);
  EXPECT_EQ(snap->tensors[1].bytes, bias);
  // Without store b, rows [2, 6) come from c.
  ReadStats stats;
  auto rows = ReadRows(w, "ckpt-1", 1, 5, {{"a", a.get()}, {"c", c.get()}}, &stats);
  ASSERT_TRUE(rows.ok()) << rows.status().message();
  EXPECT_EQ(*rows, Slice(whole, 16, 80));
}

TEST(CheckpointPieces, AssemblyRefusesGapsOverlapsAndDisagreements) {
  auto piece = [](const std::string& name, int64_t begin, int64_t end, uint32_t crc, const std::string& store) {
    PieceRecord p{name, "F32", {6, 4}, 16, {}};
    p.shard = {begin, end, crc, {store}};
    return p;
  };
  auto fails = [](Expected<std::vector<TensorRecord>> r, const std::string& needle) {
    EXPECT_FALSE(r.ok());
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
      EXPECT_TRUE(Has(r.status(), needle)) << r.status().message();
    }
  };
  fails(AssembleTensors({piece("w", 0, 2, 1, "a"), piece("w", 3, 6, 2, "b")}, {"w"}), "no piece at row 2");
  fails(AssembleTensors({piece("w", 0, 2, 1, "a")}, {"w"}), "no piece at row 2");
  fails(AssembleTensors({piece("w", 0, 3, 1, "a"), piece("w", 2, 6, 2, "b")}, {"w"}), "overlapping");
  fails(AssembleTensors({piece("w", 0, 6, 1, "a"), piece("w", 0, 6, 2, "b")}, {"w"}), "differ");
  fails(AssembleTensors({piece("w", 0, 6, 1, "a")}, {"w", "v"}), "no writer reported tensor v");
  fails(AssembleTensors({piece("w", 0, 6, 1, "a"), piece("x", 0, 6, 1, "a")}, {"w"}), "x is not in the model");
  PieceRecord other = piece("w", 2, 6, 2, "b");
  other.shape = {6, 5};
  fails(AssembleTensors({piece("w", 0, 2, 1, "a"), other}, {"w"}), "disagree");
}

TEST(CheckpointPieces, WriteRefusesPiecesThatAreNotWholeRows) {
  testing::TempDir dir;
  auto a = OpenStore(dir.path() / "a", "a");
  const std::vector<int64_t> shape = {6, 4};
  auto refused = [&](const std::vector<HostPiece>& pieces, const std::string& needle, const std::string& id = "c1") {
    auto r = WritePieces(pieces, id, *a);
    EXPECT_FALSE(r.ok());
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
      EXPECT_TRUE(Has(r.status(), needle)) << r.status().message();
    }
  };
  refused({{"w", "F32", shape, 0, 2, RandomBytes(30, 1)}}, "not whole rows");
  refused({{"w", "F32", shape, 5, 7, RandomBytes(32, 1)}}, "not whole rows");
  refused({{"w", "F32", shape, 2, 2, {}}}, "not whole rows");
  refused({{"w/x", "F32", shape, 0, 1, RandomBytes(16, 1)}}, "bad tensor name");
  refused({{"w", "F32", shape, 0, 1, RandomBytes(16, 1)}, {"w", "F32", shape, 0, 1, RandomBytes(16, 2)}},
          "two pieces of w");
  refused({{"w", "F32", shape, 0, 1, RandomBytes(16, 1)}}, "bad checkpoint id", "");
  EXPECT_TRUE(a->Checkpoints().empty()) << "a refused write leaves nothing behind";
}

TEST(CheckpointPieces, ReadOnlyStoresReadTogetherAndChangeNothing) {
  testing::TempDir dir;
  const Bytes bytes = RandomBytes(64, 3);
  {
    auto w = OpenStore(dir.path() / "s", "s");
    ASSERT_TRUE(w->Put({"ckpt-1", "t", 0}, 4, bytes).ok());
    ASSERT_TRUE(w->Sync().ok());
  }
  auto r1 = ShardStore::OpenReadOnly((dir.path() / "s").string(), "s");
  auto r2 = ShardStore::OpenReadOnly((dir.path() / "s").string(), "s");
  ASSERT_TRUE(r1.ok()) << r1.status().message();
  ASSERT_TRUE(r2.ok()) << r2.status().message() << " (two readers at once)";
  auto got = (*r1)->Get({"ckpt-1", "t", 0});
  ASSERT_TRUE(got.ok()) << got.status().message();
  EXPECT_EQ(*got, bytes);
  EXPECT_EQ((*r2)->Checkpoints(), (std::vector<std::string>{"ckpt-1"}));
  for (const Status& s : {(*r1)->Put({"ckpt-2", "t", 0}, 4, bytes).status(), (*r1)->Sync(), (*r1)->Drop("ckpt-1")}) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Has(s, "reading only")) << s.message();
  }
  EXPECT_EQ((*r2)->Checkpoints(), (std::vector<std::string>{"ckpt-1"}));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "s" / "chunks" / "ckpt-2.chunks"));
  auto missing = ShardStore::OpenReadOnly((dir.path() / "nothing").string(), "n");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "nothing")) << "a read-only open creates nothing";
}

}  // namespace
}  // namespace troupe::ckpt
