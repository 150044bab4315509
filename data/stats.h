// Token statistics: baselines a trained model must beat.
#pragma once

#include <cstdint>
#include <span>

#include "common/status.h"

namespace troupe::data {

// Cross-entropy (nats/token) of `val` under the unigram distribution of
// `train` with add-one smoothing: p(t) = (count_train(t) + 1) / (N_train + V),
// H = -mean over val of log p(t). A model that ignores context scores this.
// InvalidArgument if vocab_size < 1, val is empty, or a token >= vocab_size.
Expected<double> UnigramCrossEntropy(std::span<const uint16_t> train, std::span<const uint16_t> val,
                                     int vocab_size);

}  // namespace troupe::data
