// Learning rate as a pure function of the optimizer step (Megatron's OptimizerParamScheduler):
// linear warmup to train.lr, then cosine / linear decay to train.min_lr at train.max_steps, or
// constant. Step s is 0-based: the rate used by the (s+1)-th optimizer update.
#pragma once

#include <cstdint>

#include "yuanmoe/config/config.h"

namespace yuanmoe::train {

/// warmup:   lr * (s + 1) / warmup_steps            for s < warmup_steps (never 0 at step 0)
/// decay:    p = (s - warmup) / (max_steps - warmup), clamped to [0, 1]
///   cosine:   min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))
///   linear:   lr - (lr - min_lr) * p
///   constant: lr
double lr_at(int64_t step, const config::TrainConfig& train);

}  // namespace yuanmoe::train
