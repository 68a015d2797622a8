#include "yuanmoe/train/step.h"

#include <cmath>
#include <limits>

#include "yuanmoe/model/transformer.h"
#include "yuanmoe/train/lr_schedule.h"
#include "yuanmoe/train/pipeline.h"

namespace yuanmoe::train {

OptimizerStep::OptimizerStep(const config::RunConfig& config, model::TransformerImpl& model,
                             DistributedOptimizer& optimizer, parallel::ParallelContext& parallel)
    : config_(config), model_(model), optimizer_(optimizer), parallel_(parallel), parameters_(model.parameters()) {
  total_moe_layers_ = model::count_moe_layers(config_.moe, 0, config_.model.num_layers);
  moe_layers_before_stage_ = model::count_moe_layers(config_.moe, 0, model_.stage.first_layer);
  micro_batches_per_rank_ =
      config_.train.global_batch_size / (config_.train.micro_batch_size * parallel_.layout().dp);
}

StepResult OptimizerStep::forward_backward(int64_t completed, const std::function<data::Batch()>& next_batch) {
  StepResult result;
  result.lr = lr_at(completed, config_.train);
  optimizer_.set_learning_rate(result.lr);
  model_.zero_grad(/*set_to_none=*/true);
  for (model::Moe moe : model_.moe_layers()) moe->begin_step();  // the step's balancing statistics

  // Each micro-batch's loss is scaled by 1/m (m: this rank's micro-batches) and the data-parallel
  // ranks average their gradients: the gradient of the mean over the global batch (Megatron).
  PipelineStepOptions options;
  options.schedule = config_.parallel.pipeline_schedule;
  options.micro_batches = micro_batches_per_rank_;
  options.loss_scale = 1.0 / static_cast<double>(micro_batches_per_rank_);
  options.precision = config_.train.precision;
  const PipelineStepResult pipeline = run_pipeline_step(model_, parallel_, options, next_batch);
  if (after_backward) after_backward(completed + 1, parameters_);
  optimizer_.reduce_gradients();

  // Losses live on the last stages, router terms on every stage: one sum over the world. The
  // pipeline's waiting and total times give its measured bubble.
  Tensor sums = torch::tensor(
      {pipeline.lm_loss_sum, pipeline.aux_loss_sum, pipeline.wait_seconds, pipeline.wall_seconds}, torch::kDouble);
  parallel_.world_group.all_reduce_sum(sums);
  const double micro_batches = static_cast<double>(micro_batches_per_rank_ * parallel_.layout().dp);
  result.pipeline_bubble = sums[3].item<double>() > 0 ? sums[2].item<double>() / sums[3].item<double>() : 0.0;
  result.loss = sums[0].item<double>() / micro_batches;
  result.aux_loss = sums[1].item<double>() / micro_batches;
  result.routed_pairs_LE = global_moe_rows(pipeline.routed_pairs_LE, config_.moe.num_experts, torch::kLong);
  if (config_.moe.bias_balancing_rate > 0) {
    // Every rank's statistics of every layer, so that the bias stays the same on every rank.
    std::vector<Tensor> rows;
    for (const model::Moe& moe : model_.moe_layers()) rows.push_back(moe->step_bias_statistics().to(torch::kCPU));
    result.bias_statistics_LE =
        global_moe_rows(rows.empty() ? Tensor() : torch::stack(rows), config_.moe.num_experts + 1, torch::kDouble);
  }
  result.grad_norm = optimizer_.gradient_norm();
  return result;
}

void OptimizerStep::apply(int64_t completed, StepResult& result) {
  const int64_t step = completed + 1;
  if (!std::isfinite(result.loss) || !std::isfinite(result.aux_loss) || !std::isfinite(result.grad_norm)) {
    const std::string what =
        fmt::format("step {}: loss {} (aux {}), gradient norm {}", step, result.loss, result.aux_loss, result.grad_norm);
    if (config_.train.on_nonfinite == config::NonfinitePolicy::kStop) {
      throw std::runtime_error(what + ": not finite; nothing of this step was applied (train.on_nonfinite = stop; "
                               "lower train.lr, raise train.warmup_steps, or set it to skip)");
    }
    if (++consecutive_skips_ > config_.train.max_consecutive_skips) {
      throw std::runtime_error(what + ": " + std::to_string(consecutive_skips_) +
                               " non-finite steps in a row (train.max_consecutive_skips = " +
                               std::to_string(config_.train.max_consecutive_skips) + "); training diverged");
    }
    model_.zero_grad(/*set_to_none=*/true);
    result.skipped = true;
    result.nonfinite = what + ": not finite, step skipped (train.on_nonfinite = skip)";
    return;
  }
  consecutive_skips_ = 0;
  optimizer_.step(config_.train.grad_clip, result.grad_norm);
  update_routers(result.routed_pairs_LE, result.bias_statistics_LE,
                 config_.train.global_batch_size * config_.train.seq_length);
}

Tensor OptimizerStep::global_moe_rows(const Tensor& stage_rows_LX, int64_t width, torch::Dtype dtype) const {
  if (total_moe_layers_ == 0) return Tensor();
  Tensor all = torch::zeros({total_moe_layers_, width}, dtype);  // [total MoE layers, width]
  if (stage_rows_LX.defined()) all.narrow(0, moe_layers_before_stage_, stage_rows_LX.size(0)).copy_(stage_rows_LX);
  parallel_.world_group.all_reduce_sum(all);
  return all;
}

void OptimizerStep::update_routers(const Tensor& routed_pairs_LE, const Tensor& bias_statistics_LE,
                                   int64_t tokens) const {
  const std::vector<model::Moe> layers = model_.moe_layers();
  if (layers.empty() || !routed_pairs_LE.defined()) return;
  model::RouterStepStats stats;
  stats.tokens = tokens;
  // ReMoE's L1 coefficient follows the sparsity of all layers together (docs/routers.md); the
  // counts are global, so every rank keeps the same router state.
  stats.active_fraction_all_layers = routed_pairs_LE.sum().item<double>() /
                                     static_cast<double>(tokens * config_.moe.num_experts * routed_pairs_LE.size(0));
  const torch::Device device = parameters_.front().device();
  for (size_t l = 0; l < layers.size(); ++l) {
    stats.routed_pairs_E = routed_pairs_LE[moe_layers_before_stage_ + static_cast<int64_t>(l)].to(device);
    if (bias_statistics_LE.defined()) {
      stats.bias_statistics_E = bias_statistics_LE[moe_layers_before_stage_ + static_cast<int64_t>(l)].to(device);
    }
    layers[l]->gate->update_after_step(stats);
  }
}

}  // namespace yuanmoe::train
