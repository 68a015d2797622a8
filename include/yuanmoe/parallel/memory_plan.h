// What one rank holds of parameters, gradients and AdamW state under a parallel layout, computed
// from the config alone (no weights allocated), for `yuanmoe inspect --world-size`
// (docs/parallelism.md, "Memory per rank"). Activations are not counted.
#pragma once

#include <cstdint>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/config/config_io.h"

namespace yuanmoe::parallel {

/// Bytes per parameter element. Weights and gradients are fp32 (bf16 runs autocast over the fp32
/// weights: no separate master copy); AdamW keeps exp_avg and exp_avg_sq in fp32.
inline constexpr int64_t kParameterBytes = 4;
inline constexpr int64_t kGradientBytes = 4;
inline constexpr int64_t kOptimizerStateBytes = 8;

/// The group sizes of a layout (Megatron's: rank = stage * dp + dp_rank; expert-parallel groups
/// carved out of each stage's data-parallel ranks).
struct GroupSizes {
  int64_t world = 1;
  int64_t pipeline = 1;      ///< pp: stages
  int64_t data = 1;          ///< dp = world / pp: ranks of one stage
  int64_t expert = 1;        ///< ep: ranks splitting one MoE layer's experts, E / ep each
  int64_t expert_data = 1;   ///< edp = dp / ep: ranks holding the same experts
  bool shard_optimizer = false;  ///< AdamW state sharded over dp (non-expert) and edp (expert)
};

/// What one rank of a stage holds (every rank of a stage holds the same amounts).
struct StageMemory {
  int64_t first_layer = 0, end_layer = 0;  ///< global layers [first, end)
  int64_t non_expert_parameters = 0;  ///< replicated over the stage's dp ranks (embedding copies included)
  int64_t expert_parameters = 0;      ///< this rank's E / ep experts of each MoE layer of the stage
  int64_t parameter_bytes = 0;
  int64_t gradient_bytes = 0;
  int64_t optimizer_bytes = 0;
  int64_t total_bytes() const { return parameter_bytes + gradient_bytes + optimizer_bytes; }
};

struct MemoryPlan {
  GroupSizes groups;
  std::vector<StageMemory> stages;  ///< index = pipeline stage
  int64_t worst_stage = 0;          ///< the stage with the most total bytes (the first of equals)
};

/// The smallest world the layout allows: pp x ep (dp = ep).
int64_t smallest_world_size(const config::ParallelConfig& parallel);

/// Every problem of running `config` (already validated) on `world_size` ranks: the world must
/// split into parallel.pipeline_parallel_size stages, and config::validate_layout's rules on the
/// resulting dp. Empty = the layout is valid. Never throws.
std::vector<config::ConfigIssue> layout_issues(const config::RunConfig& config, int64_t world_size);

/// Per-stage memory of one rank. Throws config::ConfigError ("layout") listing config::validate's
/// and layout_issues' problems when there are any.
MemoryPlan memory_plan(const config::RunConfig& config, int64_t world_size);

}  // namespace yuanmoe::parallel
