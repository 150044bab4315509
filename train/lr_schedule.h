// Learning-rate schedules (BRIEF §1): linear warm-up, then cosine decay to
// min_lr_ratio * lr, or DeepSeek-LLM's multi-step (x0.316 at 80% of the
// steps, x0.1 at 90%).
#pragma once

#include "configs/config.h"

namespace troupe {

// The learning rate of 0-based optimizer step `step`.
double LearningRate(const TrainConfig& t, int step);

}  // namespace troupe
