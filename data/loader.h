// TokenLoader: fixed-length training/evaluation windows over a token stream.
//
// The stream is the concatenation of one or more shards. Window w covers
// tokens [w*seq_len, w*seq_len + seq_len + extra): consecutive windows overlap
// by `extra` tokens so every position of the first seq_len has its next
// `extra` targets (extra = 1 + MTP depth). Only windows wholly inside the
// stream exist: num_windows = (N - seq_len - extra) / seq_len + 1.
//
// Train mode: epoch e visits every window once, in the order of a
// Fisher-Yates permutation driven by std::mt19937_64 seeded from (seed, e)
// (so identical on every platform). Eval mode: windows in order, every epoch.
// Either way the stream is endless: a batch may span an epoch boundary.
//
// The position is LoaderState {epoch, cursor}; SetState(GetState()) later
// continues with exactly the batches that would have come next.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe::data {

enum class LoaderMode { kTrain, kEval };

struct LoaderOptions {
  int seq_len = 256;                    // T: positions a sample predicts from
  int extra = 1;                        // tokens past T in a window (>= 1; 1 + MTP depth)
  LoaderMode mode = LoaderMode::kTrain;  // kTrain shuffles each epoch, kEval does not
  uint64_t seed = 0;                    // permutation seed (train mode)
};

// Where the loader stands: `cursor` windows of epoch `epoch` are consumed.
// GetState() always reports cursor < num_windows (the epoch rolls over).
struct LoaderState {
  uint64_t epoch = 0;
  uint64_t cursor = 0;
  bool operator==(const LoaderState&) const = default;
};

// Not thread-safe: one loader per consumer.
class TokenLoader {
 public:
  // InvalidArgument if seq_len < 1, extra < 1, or the stream holds fewer
  // than seq_len + extra tokens (no window).
  static Expected<TokenLoader> Create(std::vector<uint16_t> tokens, const LoaderOptions& options);
  // Reads (ReadShard, validated against vocab_size) and concatenates shards.
  static Expected<TokenLoader> Open(const std::vector<std::string>& shard_paths, int vocab_size,
                                    const LoaderOptions& options);

  // The next batch_size windows: int32 tokens (batch_size, seq_len + extra),
  // row-major. InvalidArgument if batch_size < 1.
  Expected<std::vector<int32_t>> NextBatch(int batch_size);

  LoaderState GetState() const { return state_; }
  // InvalidArgument if cursor > num_windows (cursor == num_windows means the
  // start of the next epoch).
  Status SetState(const LoaderState& state);
  // Back to {epoch 0, cursor 0}.
  void Reset();

  int64_t num_windows() const { return num_windows_; }
  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int window_len() const { return options_.seq_len + options_.extra; }
  const LoaderOptions& options() const { return options_; }

  // The window index the cursor of `epoch` maps to (the permutation in train
  // mode, the identity in eval mode). Exposed for tests.
  int64_t WindowAt(uint64_t epoch, uint64_t cursor);

 private:
  TokenLoader(std::vector<uint16_t> tokens, const LoaderOptions& options, int64_t num_windows);
  void EnsurePermutation(uint64_t epoch);

  std::vector<uint16_t> tokens_;  // (N,) the concatenated stream
  LoaderOptions options_;
  int64_t num_windows_ = 0;
  LoaderState state_;
  std::vector<int64_t> order_;    // (num_windows,) window order of order_epoch_
  uint64_t order_epoch_ = UINT64_MAX;
};

}  // namespace troupe::data
