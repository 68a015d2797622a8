// Whole-config validation: ranges and cross-field rules, every problem with its JSON path.
#pragma once

#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/config/config_io.h"

namespace yuanmoe::config {

/// Every rule the parsed config breaks (empty = valid). Never throws.
std::vector<ConfigIssue> validate(const RunConfig& config);

/// Options that are set but have no effect with the other settings (logged, not fatal).
std::vector<ConfigIssue> config_warnings(const RunConfig& config);

}  // namespace yuanmoe::config
