// Token statistics: see stats.h.
#include "data/stats.h"

#include <cmath>
#include <string>
#include <vector>

namespace troupe::data {

Expected<double> UnigramCrossEntropy(std::span<const uint16_t> train, std::span<const uint16_t> val,
                                     int vocab_size) {
  if (vocab_size < 1) return Status::InvalidArgument("unigram: vocab_size must be >= 1");
  if (val.empty()) return Status::InvalidArgument("unigram: no validation tokens");
  std::vector<int64_t> counts(static_cast<size_t>(vocab_size), 0);
  for (uint16_t t : train) {
    if (t >= vocab_size) {
      return Status::InvalidArgument("unigram: train token " + std::to_string(t) + " >= vocab_size " +
                                     std::to_string(vocab_size));
    }
    ++counts[t];
  }
  const double log_total = std::log(static_cast<double>(train.size()) + vocab_size);
  double nll = 0.0;
  for (uint16_t t : val) {
    if (t >= vocab_size) {
      return Status::InvalidArgument("unigram: val token " + std::to_string(t) + " >= vocab_size " +
                                     std::to_string(vocab_size));
    }
    nll += log_total - std::log(static_cast<double>(counts[t]) + 1.0);
  }
  return nll / static_cast<double>(val.size());
}

}  // namespace troupe::data
