// The arithmetic of docs/parallelism.md, "Memory per rank": stage counts from model/param_count.h,
// divided as the layout divides them.
#include "yuanmoe/parallel/memory_plan.h"

#include "yuanmoe/config/validate.h"
#include "yuanmoe/model/param_count.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::parallel {
namespace {

int64_t ceil_div(int64_t n, int64_t g) { return (n + g - 1) / g; }

/// Optimizer-state elements one rank keeps of a flat buffer of `n` elements shared by a group of
/// `g` ranks: all of it unsharded; sharded, ceil(n / g) (the buffer is padded to a multiple of g).
int64_t optimizer_elements(int64_t n, int64_t g, bool sharded) { return sharded ? ceil_div(n, g) : n; }

}  // namespace

int64_t smallest_world_size(const config::ParallelConfig& parallel) {
  return parallel.pipeline_parallel_size * parallel.expert;
}

std::vector<config::ConfigIssue> layout_issues(const config::RunConfig& config, int64_t world_size) {
  const int64_t pp = config.parallel.pipeline_parallel_size;
  if (pp < 1 || config.parallel.expert < 1) return {};  // validate() reports them
  if (world_size < 1) return {{"", "the world size must be >= 1, got " + std::to_string(world_size)}};
  if (world_size % pp != 0) {
    return {{"parallel.pipeline_parallel_size", "is " + std::to_string(pp) + ", which does not divide the world size (" +
                                                    std::to_string(world_size) + ")"}};
  }
  return config::validate_layout(config, world_size / pp);
}

MemoryPlan memory_plan(const config::RunConfig& config, int64_t world_size) {
  std::vector<config::ConfigIssue> issues = config::validate(config);
  for (auto& issue : layout_issues(config, world_size)) issues.push_back(std::move(issue));
  if (!issues.empty()) throw config::ConfigError("layout", issues);

  const config::ParallelConfig& parallel = config.parallel;
  MemoryPlan plan;
  GroupSizes& g = plan.groups;
  g.world = world_size;
  g.pipeline = parallel.pipeline_parallel_size;
  g.data = world_size / g.pipeline;
  g.expert = parallel.expert;
  g.expert_data = g.data / g.expert;
  g.shard_optimizer = parallel.shard_optimizer;

  for (int64_t s = 0; s < g.pipeline; ++s) {
    const model::StageSpec spec = model::balanced_stage(config.model.num_layers, g.pipeline, s,
                                                        parallel.first_stage_layers, parallel.last_stage_layers);
    const model::ParameterCounts counts = model::stage_parameters(config.model, config.moe, spec);
    StageMemory stage;
    stage.first_layer = spec.first_layer;
    stage.end_layer = spec.end_layer;
    stage.non_expert_parameters = counts.non_expert;
    stage.expert_parameters = counts.expert / g.expert;  // E % ep == 0 (validate)
    const int64_t held = stage.non_expert_parameters + stage.expert_parameters;
    stage.parameter_bytes = kParameterBytes * held;
    stage.gradient_bytes = kGradientBytes * held;
    // Two flat buffers: non-expert state over the dp group, this rank's experts' over edp.
    stage.optimizer_bytes =
        kOptimizerStateBytes * (optimizer_elements(stage.non_expert_parameters, g.data, g.shard_optimizer) +
                                optimizer_elements(stage.expert_parameters, g.expert_data, g.shard_optimizer));
    if (!plan.stages.empty() && stage.total_bytes() > plan.stages[plan.worst_stage].total_bytes()) {
      plan.worst_stage = s;
    }
    plan.stages.push_back(stage);
  }
  return plan;
}

}  // namespace yuanmoe::parallel
