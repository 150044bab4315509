// The tokenizer: sentencepiece byte-level BPE (BPE with byte fallback, so
// every byte sequence is representable), trained deterministically.
//
// Text format (what DocumentsToText writes): one sentence per line, a blank
// line between documents. EncodeText turns it into one token stream:
//   <s> line1 </s> line2 </s> ... <s> line1 </s> ...   (<s> opens a document,
// </s> ends a line), and DecodeText inverts it, so for text in that format
// (normalised: single spaces, NFKC) DecodeText(EncodeText(t)) == t.
// Ids: 0 = <unk> (unused with byte fallback), 1 = <s>, 2 = </s>, then 256
// byte pieces <0x00>..<0xFF>, then the learned pieces.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace troupe::data {

struct TokenizerTrainOptions {
  int vocab_size = 2048;               // all pieces: 3 specials + 256 bytes + merges; at most 65536 (uint16 shards)
  double character_coverage = 0.9995;  // characters below this coverage fall back to bytes
  uint32_t seed = 1234;                // sentencepiece's global random seed (BPE barely uses it)
};

// Trains on `text_path` (the text format above; blank lines are ignored) and
// writes <model_prefix>.model and <model_prefix>.vocab. Deterministic: one
// thread, every sentence used, no shuffling. InvalidArgument for a bad
// vocab_size (sentencepiece's message says e.g. that it is below the number
// of distinct characters + 259), NotFound for a missing input.
// Not thread-safe: it sets sentencepiece's global seed.
Status TrainTokenizer(const std::string& text_path, const std::string& model_prefix,
                      const TokenizerTrainOptions& options = {});

// A loaded model. Encode/Decode are const and thread-safe.
class Tokenizer {
 public:
  // NotFound for a missing file, Corruption for one sentencepiece rejects,
  // InvalidArgument if its vocabulary does not fit uint16 shards.
  static Expected<Tokenizer> Load(const std::string& model_path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  int vocab_size() const;
  int bos_id() const;  // <s>: starts a document
  int eos_id() const;  // </s>: ends a line

  // The pieces of one line (no <s>/</s>); a '\n' in it counts as a space.
  Expected<std::vector<int>> Encode(std::string_view line) const;
  // Inverse of Encode; <s>/</s> in `ids` are dropped.
  Expected<std::string> Decode(const std::vector<int>& ids) const;

  // Text format -> token stream and back (see the top of this file).
  Expected<std::vector<int>> EncodeText(std::string_view text) const;
  Expected<std::string> DecodeText(const std::vector<int>& ids) const;

 private:
  explicit Tokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> sp);
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace troupe::data
