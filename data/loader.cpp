// TokenLoader: see loader.h.
#include "data/loader.h"

#include <random>

#include "data/shards.h"

namespace troupe::data {

namespace {

// Uniform integer in [0, bound) from the raw 64-bit generator, by rejection
// (the standard distributions are implementation-defined; this is not).
uint64_t UniformBelow(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound: the biased low values
  for (;;) {
    const uint64_t r = rng();
    if (r >= threshold) return r % bound;
  }
}

}  // namespace

TokenLoader::TokenLoader(std::vector<uint16_t> tokens, const LoaderOptions& options, int64_t num_windows)
    : tokens_(std::move(tokens)), options_(options), num_windows_(num_windows) {}

Expected<TokenLoader> TokenLoader::Create(std::vector<uint16_t> tokens, const LoaderOptions& options) {
  if (options.seq_len < 1) {
    return Status::InvalidArgument("loader: seq_len=" + std::to_string(options.seq_len) + " must be >= 1");
  }
  if (options.extra < 1) {
    return Status::InvalidArgument("loader: extra=" + std::to_string(options.extra) + " must be >= 1");
  }
  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t window = int64_t{options.seq_len} + options.extra;
  if (n < window) {
    return Status::InvalidArgument("loader: the stream holds " + std::to_string(n) +
                                   " tokens, fewer than one window of seq_len + extra = " + std::to_string(window));
  }
  const int64_t num_windows = (n - window) / options.seq_len + 1;
  return TokenLoader(std::move(tokens), options, num_windows);
}

Expected<TokenLoader> TokenLoader::Open(const std::vector<std::string>& shard_paths, int vocab_size,
                                        const LoaderOptions& options) {
  if (shard_paths.empty()) return Status::InvalidArgument("loader: no shards given");
  std::vector<uint16_t> tokens;
  for (const std::string& path : shard_paths) {
    TROUPE_ASSIGN_OR_RETURN(std::vector<uint16_t> shard, ReadShard(path, vocab_size));
    tokens.insert(tokens.end(), shard.begin(), shard.end());
  }
  return Create(std::move(tokens), options);
}

void TokenLoader::EnsurePermutation(uint64_t epoch) {
  if (order_epoch_ == epoch) return;
  order_.resize(static_cast<size_t>(num_windows_));
  for (int64_t i = 0; i < num_windows_; ++i) order_[static_cast<size_t>(i)] = i;
  if (options_.mode == LoaderMode::kTrain) {
    // seed_seq's mixing is specified by the standard, so the order is too.
    std::seed_seq seq{static_cast<uint32_t>(options_.seed), static_cast<uint32_t>(options_.seed >> 32),
                      static_cast<uint32_t>(epoch), static_cast<uint32_t>(epoch >> 32)};
    std::mt19937_64 rng(seq);
    for (int64_t i = num_windows_ - 1; i > 0; --i) {  // Fisher-Yates
      const auto j = static_cast<int64_t>(UniformBelow(rng, static_cast<uint64_t>(i) + 1));
      std::swap(order_[static_cast<size_t>(i)], order_[static_cast<size_t>(j)]);
    }
  }
  order_epoch_ = epoch;
}

int64_t TokenLoader::WindowAt(uint64_t epoch, uint64_t cursor) {
  EnsurePermutation(epoch);
  return order_[static_cast<size_t>(cursor)];
}

Expected<std::vector<int32_t>> TokenLoader::NextBatch(int batch_size) {
  if (batch_size < 1) {
    return Status::InvalidArgument("loader: batch_size=" + std::to_string(batch_size) + " must be >= 1");
  }
  const auto len = static_cast<size_t>(window_len());
  std::vector<int32_t> batch(static_cast<size_t>(batch_size) * len);  // (B, T + extra)
  for (int b = 0; b < batch_size; ++b) {
    const int64_t w = WindowAt(state_.epoch, state_.cursor);
    const uint16_t* src = tokens_.data() + w * options_.seq_len;
    int32_t* dst = batch.data() + static_cast<size_t>(b) * len;
    for (size_t t = 0; t < len; ++t) dst[t] = src[t];
    if (++state_.cursor == static_cast<uint64_t>(num_windows_)) state_ = {state_.epoch + 1, 0};
  }
  return batch;
}

Status TokenLoader::SetState(const LoaderState& state) {
  if (state.cursor > static_cast<uint64_t>(num_windows_)) {
    return Status::InvalidArgument("loader: state cursor " + std::to_string(state.cursor) + " is past the " +
                                   std::to_string(num_windows_) + " windows of an epoch");
  }
  state_ = state.cursor == static_cast<uint64_t>(num_windows_) ? LoaderState{state.epoch + 1, 0} : state;
  return Status::Ok();
}

void TokenLoader::Reset() { state_ = {}; }

}  // namespace troupe::data
