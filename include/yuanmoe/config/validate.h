// Whole-config validation: ranges and cross-field rules, every problem with its JSON path.
#pragma once

#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/config/config_io.h"

namespace yuanmoe::config {

/// Every rule the parsed config breaks (empty = valid). Never throws.
std::vector<ConfigIssue> validate(const RunConfig& config);

/// The rules of the parallel layout once its data-parallel size is known: parallel.expert
/// divides it (what `yuanmoe inspect --world-size` checks without a training run).
std::vector<ConfigIssue> validate_layout(const RunConfig& config, int64_t data_parallel_size);

/// The rules a training run adds once its data-parallel size is known (every rank runs them
/// and reports the same issues): data.train_prefix set, the global batch divisible into
/// micro-batches per data-parallel rank, and validate_layout's.
std::vector<ConfigIssue> validate_training(const RunConfig& config, int64_t data_parallel_size);

/// Options that are set but have no effect with the other settings (logged, not fatal).
std::vector<ConfigIssue> config_warnings(const RunConfig& config);

}  // namespace yuanmoe::config
