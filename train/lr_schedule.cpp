#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace troupe {

double LearningRate(const TrainConfig& t, int step) {
  if (step < t.warmup_steps) return t.lr * (step + 1) / t.warmup_steps;
  const double progress =
      t.steps > t.warmup_steps ? std::clamp(double(step - t.warmup_steps) / (t.steps - t.warmup_steps), 0.0, 1.0) : 1.0;
  if (t.schedule == LrSchedule::kMultiStep) {
    const double done = double(step + 1) / t.steps;  // share of the run's tokens seen
    return t.lr * (done > 0.9 ? 0.1 : done > 0.8 ? 0.316 : 1.0);
  }
  const double min_lr = t.lr * t.min_lr_ratio;
  return min_lr + (t.lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

AdamWParams AdamWSettings(const TrainConfig& t, double lr, double clip_scale, int step, bool decay) {
  AdamWParams p;
  p.lr = lr;
  p.beta1 = t.beta1;
  p.beta2 = t.beta2;
  p.eps = t.adam_eps;
  p.weight_decay = decay ? t.weight_decay : 0.0;
  p.step = step;
  p.grad_scale = clip_scale;
  return p;
}

}  // namespace troupe
