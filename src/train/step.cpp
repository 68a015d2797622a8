#include "yuanmoe/train/step.h"

#include <cmath>
#include <limits>
#include <numeric>

#include "yuanmoe/core/host_sync.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/lr_schedule.h"
#include "yuanmoe/train/pipeline.h"

namespace yuanmoe::train {

OptimizerStep::OptimizerStep(const config::RunConfig& config, model::TransformerImpl& model,
                             DistributedOptimizer& optimizer, parallel::ParallelContext& parallel)
    : config_(config),
      model_(model),
      optimizer_(optimizer),
      parallel_(parallel),
      router_balancing_(config, model, parallel),
      derived_(config::resolve_derived(config, parallel.layout().dp)) {}

LossWeights loss_weights(config::LossAverage average, const std::vector<int64_t>& counted,
                         parallel::ParallelContext& parallel) {
  const auto micro_batches = static_cast<int64_t>(counted.size());
  const int64_t dp = parallel.layout().dp;
  LossWeights weights;
  if (average == config::LossAverage::kMicroBatch) {
    weights.lm_loss_scales.assign(counted.size(), 1.0 / static_cast<double>(micro_batches));
    weights.lm_report_weights.assign(counted.size(), 1.0);
    weights.lm_report_divisor = static_cast<double>(micro_batches * dp);
    return weights;
  }
  // Every stage of a data-parallel replica reads the same micro-batches: the world's sum counts
  // each replica's labels once per stage. Gloo, on the host.
  Tensor sum = torch::tensor({std::accumulate(counted.begin(), counted.end(), int64_t{0})}, torch::kLong);
  parallel.world_group.all_reduce_sum(sum);
  const int64_t global = std::max<int64_t>(sum.data_ptr<int64_t>()[0] / parallel.layout().pp, 1);  // none: no LM loss
  for (const int64_t n : counted) {
    // The data-parallel mean of the gradients divides by dp again. Integers until the one
    // division, so equal counts give exactly 1 / micro_batches.
    weights.lm_loss_scales.push_back(static_cast<double>(n * dp) / static_cast<double>(global));
    weights.lm_report_weights.push_back(static_cast<double>(n));
  }
  weights.lm_report_divisor = static_cast<double>(global);
  return weights;
}

namespace {

/// This stage's figures of the step in one fp64 vector on its device: [squared gradient norm,
/// router terms sum, LM losses (M), routed pairs (L_stage x E), bias statistics
/// (L_stage x (E + 1))]; the pairs when the stage has MoE layers, the statistics when bias
/// balancing is on.
Tensor pack_stage_figures(const PipelineStepResult& pipeline, const Tensor& squared_norm,
                          const Tensor& bias_statistics_LE) {
  std::vector<Tensor> parts{squared_norm.reshape({1}), pipeline.aux_loss_sum.reshape({1}), pipeline.lm_losses_M};
  if (pipeline.routed_pairs_LE.defined()) parts.push_back(pipeline.routed_pairs_LE.reshape(-1).to(torch::kDouble));
  if (bias_statistics_LE.defined()) parts.push_back(bias_statistics_LE.reshape(-1));
  const torch::Device device = squared_norm.device();
  for (Tensor& part : parts) part = part.to(device, torch::kDouble);
  return torch::cat(parts);
}

}  // namespace

StepResult OptimizerStep::forward_backward(int64_t completed, const std::function<data::Batch()>& next_batch) {
  StepResult result;
  result.lr = lr_at(completed, config_.train);
  optimizer_.set_learning_rate(result.lr);
  model_.zero_grad(/*set_to_none=*/true);
  router_balancing_.begin_step();

  // The step's micro-batches first: their counted labels (on the host, no wait for the device)
  // set each one's LM loss scale before any backward.
  const int64_t micro_batches = derived_.micro_batches_per_rank;
  std::vector<data::Batch> batches;
  std::vector<int64_t> counted(static_cast<size_t>(micro_batches));
  for (int64_t i = 0; i < micro_batches; ++i) {
    batches.push_back(next_batch());
    counted[static_cast<size_t>(i)] = counted_labels(batches.back().labels);
  }
  const LossWeights weights = loss_weights(config_.train.loss_average, counted, parallel_);

  PipelineStepOptions options;
  options.schedule = config_.parallel.pipeline_schedule;
  options.lm_loss_scales = weights.lm_loss_scales;
  options.aux_loss_scale = 1.0 / static_cast<double>(micro_batches);
  options.precision = config_.train.precision;
  options.before_last_backward = [this] { optimizer_.reduce_during_next_backward(); };
  const PipelineStepResult pipeline = run_pipeline_step(model_, parallel_, options, batches);
  optimizer_.reduce_gradients();
  if (after_reduction) after_reduction(completed + 1, optimizer_.gradients());
  const Tensor squared_norm = optimizer_.squared_gradient_norm();
  const Tensor bias_statistics_LE = router_balancing_.stage_bias_statistics();  // [L_stage, E + 1] on the device

  // Up to here the step has only queued work on the device. Its figures come back in one copy,
  // its one wait for the device (core/host_sync.h); the rest is host arithmetic and Gloo.
  const ExpectedHostSync figures_read;
  const Tensor stage = pack_stage_figures(pipeline, squared_norm, bias_statistics_LE).to(torch::kCPU);
  const int64_t experts = config_.moe.num_experts;
  const auto stage_layers = static_cast<int64_t>(model_.moe_layers().size());
  const double* figures = stage.data_ptr<double>();
  double lm_loss = 0.0;  // this rank's share of the step's LM loss, before the world sum
  for (int64_t i = 0; i < micro_batches; ++i) lm_loss += figures[2 + i] * weights.lm_report_weights[static_cast<size_t>(i)];
  int64_t offset = 2 + micro_batches;
  const auto take_rows = [&](int64_t width, torch::Dtype dtype) {
    const Tensor rows = stage.narrow(0, offset, stage_layers * width).view({stage_layers, width}).to(dtype);
    offset += stage_layers * width;
    return rows;
  };
  const Tensor stage_pairs_LE = pipeline.routed_pairs_LE.defined() ? take_rows(experts, torch::kLong) : Tensor();
  const Tensor stage_bias_LE = bias_statistics_LE.defined() ? take_rows(experts + 1, torch::kDouble) : Tensor();

  // Losses live on the last stages, router terms on every stage: one sum over the world. The
  // pipeline's waiting and total times give its measured bubble.
  Tensor sums = torch::tensor({lm_loss, figures[1], pipeline.wait_seconds, pipeline.wall_seconds}, torch::kDouble);
  parallel_.world_group.all_reduce_sum(sums);
  const double* summed = sums.data_ptr<double>();
  result.pipeline_bubble = summed[3] > 0 ? summed[2] / summed[3] : 0.0;
  result.loss = summed[0] / weights.lm_report_divisor;
  result.aux_loss = summed[1] / static_cast<double>(micro_batches * parallel_.layout().dp);
  result.grad_norm = std::sqrt(figures[0]);  // already summed over the groups that hold parts of it
  result.routed_pairs_LE = router_balancing_.layer_rows().over_world(stage_pairs_LE, experts, torch::kLong);
  if (result.routed_pairs_LE.defined()) {
    const int64_t slots = config_.train.global_batch_size * config_.train.seq_length * experts *
                          result.routed_pairs_LE.size(0);  // (token, expert) pairs of all MoE layers
    result.routed_fraction = result.routed_pairs_LE.sum().item<double>() / static_cast<double>(slots);
  }
  // Every rank's statistics of every layer, so that the bias stays the same on every rank.
  if (router_balancing_.has_bias()) {
    result.bias_statistics_LE = router_balancing_.layer_rows().over_world(stage_bias_LE, experts + 1, torch::kDouble);
  }
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
  router_balancing_.update_routers(result.routed_pairs_LE, result.bias_statistics_LE, result.routed_fraction);
  optimizer_.step(config_.train.grad_clip, result.grad_norm);
}

}  // namespace yuanmoe::train
