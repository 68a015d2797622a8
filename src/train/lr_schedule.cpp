#include "yuanmoe/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace yuanmoe::train {

double lr_at(int64_t step, const config::TrainConfig& train) {
  if (step < train.warmup_steps) {
    return train.lr * static_cast<double>(step + 1) / static_cast<double>(train.warmup_steps);
  }
  const int64_t decay_steps = train.max_steps - train.warmup_steps;
  const double progress =
      decay_steps <= 0
          ? 1.0
          : std::clamp(static_cast<double>(step - train.warmup_steps) / decay_steps, 0.0, 1.0);
  switch (train.lr_schedule) {
    case config::LrSchedule::kConstant:
      return train.lr;
    case config::LrSchedule::kLinear:
      return train.lr - (train.lr - train.min_lr) * progress;
    case config::LrSchedule::kCosine:
      return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
  }
  return train.lr;
}

}  // namespace yuanmoe::train
