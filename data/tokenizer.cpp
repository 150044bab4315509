// sentencepiece byte-level BPE: see tokenizer.h.
#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <unordered_map>

namespace troupe::data {

namespace {

constexpr int kUnkId = 0;
constexpr int kBosId = 1;
constexpr int kEosId = 2;
constexpr int kMaxVocab = 65536;  // ids must fit the uint16 shards

std::string SpMessage(const sentencepiece::util::Status& st) { return st.ToString(); }

}  // namespace

Status TrainTokenizer(const std::string& text_path, const std::string& model_prefix,
                      const TokenizerTrainOptions& options) {
  if (options.vocab_size < 260 || options.vocab_size > kMaxVocab) {
    return Status::InvalidArgument("tokenizer: vocab_size=" + std::to_string(options.vocab_size) +
                                   " must be in [260, 65536] (3 specials + 256 bytes + at least one piece)");
  }
  std::error_code ec;
  if (!std::filesystem::is_regular_file(text_path, ec)) {
    return Status::NotFound("tokenizer: training text " + text_path + " does not exist");
  }
  const std::unordered_map<std::string, std::string> args = {
      {"input", text_path},
      {"model_prefix", model_prefix},
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", std::to_string(options.character_coverage)},
      {"num_threads", "1"},
      {"input_sentence_size", "0"},  // use every sentence ...
      {"shuffle_input_sentence", "false"},  // ... in file order
      {"unk_id", std::to_string(kUnkId)},
      {"bos_id", std::to_string(kBosId)},
      {"eos_id", std::to_string(kEosId)},
      {"pad_id", "-1"},
      {"minloglevel", "2"},  // sentencepiece logs every merge otherwise
  };
  sentencepiece::SetRandomGeneratorSeed(options.seed);
  const auto st = sentencepiece::SentencePieceTrainer::Train(args);
  if (!st.ok()) return Status::InvalidArgument("tokenizer: training on " + text_path + " failed: " + SpMessage(st));
  return Status::Ok();
}

Tokenizer::Tokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> sp) : sp_(std::move(sp)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Expected<Tokenizer> Tokenizer::Load(const std::string& model_path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_path, ec)) {
    return Status::NotFound("tokenizer model " + model_path + " does not exist");
  }
  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto st = sp->Load(model_path);
  if (!st.ok()) return Status::Corruption("tokenizer model " + model_path + ": " + SpMessage(st));
  if (sp->GetPieceSize() > kMaxVocab) {
    return Status::InvalidArgument("tokenizer model " + model_path + " has " + std::to_string(sp->GetPieceSize()) +
                                   " pieces; shards hold uint16 ids (at most 65536)");
  }
  if (sp->bos_id() < 0 || sp->eos_id() < 0) {
    return Status::InvalidArgument("tokenizer model " + model_path + " lacks <s> or </s>; train it with troupe");
  }
  return Tokenizer(std::move(sp));
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }

Expected<std::vector<int>> Tokenizer::Encode(std::string_view line) const {
  std::vector<int> ids;
  const auto st = sp_->Encode(line, &ids);
  if (!st.ok()) return Status::Internal("tokenizer: encode failed: " + SpMessage(st));
  return ids;
}

Expected<std::string> Tokenizer::Decode(const std::vector<int>& ids) const {
  std::vector<int> pieces;
  pieces.reserve(ids.size());
  for (int id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return Status::InvalidArgument("tokenizer: id " + std::to_string(id) + " outside the vocabulary [0, " +
                                     std::to_string(vocab_size()) + ")");
    }
    if (id != bos_id() && id != eos_id()) pieces.push_back(id);
  }
  std::string text;
  const auto st = sp_->Decode(pieces, &text);
  if (!st.ok()) return Status::Internal("tokenizer: decode failed: " + SpMessage(st));
  return text;
}

Expected<std::vector<int>> Tokenizer::EncodeText(std::string_view text) const {
  std::vector<int> ids;
  bool doc_open = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    pos = eol + 1;
    if (line.find_first_not_of(" \t") == std::string_view::npos) {
      doc_open = false;  // a blank line ends the document
      continue;
    }
    if (!doc_open) ids.push_back(bos_id());
    doc_open = true;
    TROUPE_ASSIGN_OR_RETURN(std::vector<int> line_ids, Encode(line));
    ids.insert(ids.end(), line_ids.begin(), line_ids.end());
    ids.push_back(eos_id());
  }
  return ids;
}

Expected<std::string> Tokenizer::DecodeText(const std::vector<int>& ids) const {
  std::string text;
  std::vector<int> line;
  auto flush = [&]() -> Status {
    if (line.empty()) return Status::Ok();
    TROUPE_ASSIGN_OR_RETURN(std::string s, Decode(line));
    text += s;
    line.clear();
    return Status::Ok();
  };
  for (int id : ids) {
    if (id == bos_id()) {
      TROUPE_RETURN_IF_ERROR(flush());
      if (!text.empty()) text += '\n';  // the blank line between documents
    } else if (id == eos_id()) {
      TROUPE_RETURN_IF_ERROR(flush());
      text += '\n';
    } else {
      line.push_back(id);
    }
  }
  TROUPE_RETURN_IF_ERROR(flush());
  return text;
}

}  // namespace troupe::data
