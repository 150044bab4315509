// Learning-rate schedules (BRIEF §1): linear warm-up, then cosine decay to
// min_lr_ratio * lr, or DeepSeek-LLM's multi-step (x0.316 at 80% of the
// steps, x0.1 at 90%). And the AdamW settings of one step.
#pragma once

#include "configs/config.h"
#include "gpu/backend.h"

namespace troupe {

// The learning rate of 0-based optimizer step `step`.
double LearningRate(const TrainConfig& t, int step);

// AdamW for 1-based optimizer step `step`: the config's betas and eps,
// weight decay only where `decay` (matrices), gradients scaled by `clip_scale`.
AdamWParams AdamWSettings(const TrainConfig& t, double lr, double clip_scale, int step, bool decay);

}  // namespace troupe
