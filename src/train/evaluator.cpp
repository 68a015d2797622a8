#include "yuanmoe/train/evaluator.h"

#include <stdexcept>

#include "yuanmoe/train/pipeline.h"

namespace yuanmoe::train {

Evaluator::Evaluator(const config::RunConfig& config, model::TransformerImpl& model,
                     parallel::ParallelContext& parallel, std::vector<ValidationSplit> splits)
    : config_(config),
      model_(model),
      parallel_(parallel),
      splits_(std::move(splits)),
      layer_rows_(config, model.stage, parallel) {}

EvalReport Evaluator::run() {
  if (splits_.empty()) throw std::logic_error("Evaluator::run: no validation splits (ask has_splits() first)");
  model_.eval();
  for (const model::Moe& layer : model_.moe_layers()) layer->gate->take_eval_stats();  // the sums start at zero
  // With data.valid_prefix the headline is its split, first; else the blend of all the others.
  const bool valid_prefix = splits_.front().name.empty();
  EvalReport report;
  std::vector<double> weights;
  for (size_t i = 0; i < splits_.size(); ++i) {
    EvalResult result = evaluate_split(splits_[i]);
    if (i == 0 && valid_prefix) {
      report.headline = std::move(result);
      report.router_sums = take_router_sums();
      continue;
    }
    report.source_names.push_back(splits_[i].name);
    report.sources.push_back(std::move(result));
    weights.push_back(splits_[i].weight);
  }
  if (!valid_prefix) {
    report.headline = blend_eval_result(report.sources, weights);
    report.router_sums = take_router_sums();
  }
  model_.train();
  return report;
}

EvalResult Evaluator::evaluate_split(const ValidationSplit& split) {
  // The data-parallel ranks take turns at the micro-batches (the sampler interleaves them by rank).
  const parallel::ParallelLayout& layout = parallel_.layout();
  const int64_t steps = (config_.train.eval_steps + layout.dp - 1) / layout.dp;
  data::SamplerOptions options = split.options;
  options.rank = layout.dp_rank;
  options.world_size = layout.dp;
  EvalResult result = evaluate(
      [&](const data::Batch& batch) { return pipeline_forward(model_, parallel_, batch, config_.train.precision); },
      split.dataset, options, steps);
  // The losses live on the last stages.
  Tensor sums = torch::tensor({layout.last_stage() ? result.loss_sum : 0.0,
                               layout.last_stage() ? static_cast<double>(result.tokens) : 0.0},
                              torch::kDouble);
  parallel_.world_group.all_reduce_sum(sums);
  result.loss_sum = sums[0].item<double>();
  result.tokens = static_cast<int64_t>(sums[1].item<double>());
  result.routed_pairs_LE = layer_rows_.over_world(result.routed_pairs_LE, config_.moe.num_experts, torch::kLong);
  result.finish();
  return result;
}

Tensor Evaluator::take_router_sums() {
  const std::vector<model::Moe> layers = model_.moe_layers();
  Tensor stage_sums;  // [L_stage, 4]
  if (!layers.empty()) {
    stage_sums = torch::zeros({static_cast<int64_t>(layers.size()), 4}, torch::kDouble);
    for (size_t l = 0; l < layers.size(); ++l) {
      const model::RouterEvalStats stats = layers[l]->gate->take_eval_stats();
      stage_sums[static_cast<int64_t>(l)] = torch::tensor(
          {stats.entropy_sum, static_cast<double>(stats.tokens), stats.tied_tokens, stats.exactly_tied_tokens},
          torch::kDouble);
    }
  }
  return layer_rows_.over_world(stage_sums, 4, torch::kDouble);
}

}  // namespace yuanmoe::train
