// One optimizer step, top to bottom, the same for `yuanmoe train` and `yuanmoe bench`:
//   learning rate -> zero grads -> the pipeline schedule over this rank's micro-batches
//   (train/pipeline.h; one stage: plain gradient accumulation; the last backward starts the
//   gradient reduction, bucket by bucket) -> gradients reduced (tied copies summed,
//   data-parallel mean; train/distributed_optimizer.h) -> global gradient norm ->
//   the step's figures read back from the device in one copy, its one wait for the device
//   (core/host_sync.h) -> loss, router terms and routed-pair counts reduced over the world ->
//   the non-finite policy -> the routers' balancing updates (ReMoE's L1 coefficient, the
//   aux-loss-free bias; train/router_balancing.h) -> clip -> AdamW (sharded or not).
// Every rank reaches the same decision at every branch: what it branches on is reduced first.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/config/derived.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/router_balancing.h"

namespace yuanmoe::train {

/// What one optimizer step measured (every field equal on every rank).
struct StepResult {
  double loss = 0.0;      // language-model loss, mean over the global batch
  double aux_loss = 0.0;  // router terms as added to the loss
  double grad_norm = 0.0;
  double lr = 0.0;
  double pipeline_bubble = 0.0;  // stages' mean fraction of the schedule spent waiting (pp > 1)
  bool skipped = false;          // non-finite and train.on_nonfinite = skip: nothing applied
  std::string nonfinite;         // when skipped: what was not finite
  Tensor routed_pairs_LE;        // routed (token, expert) pairs per MoE layer of the whole model, int64 CPU
  double routed_fraction = 0.0;  // routed pairs / (tokens x experts x MoE layers): ReMoE's sparsity
  // The bias statistics per MoE layer of the whole model (model::RouterImpl::step_bias_statistics
  // summed over the world), fp64 CPU [L, E + 1]; undefined unless moe.bias_balancing_rate > 0.
  Tensor bias_statistics_LE;
};

/// How the step weighs each micro-batch's LM loss (its mean over its counted labels).
struct LossWeights {
  std::vector<double> lm_loss_scales;     ///< per micro-batch: its scale in the backward
  std::vector<double> lm_report_weights;  ///< per micro-batch: its weight in the reported loss ...
  double lm_report_divisor = 1.0;         ///< ... whose world sum this divides
};

/// train.loss_average over this rank's micro-batches with `counted` labels each. token: scale
/// n_i * dp / N, N the counted labels of the whole global batch (summed over the world), so the
/// data-parallel mean of the gradients is that of (sum of every counted label's loss) / N
/// (Megatron-Core's --calculate-per-token-loss); reported: sum n_i * mean_i / N. micro_batch: scale
/// 1 / M; reported: the mean of the M * dp means (the official Yuan code).
LossWeights loss_weights(config::LossAverage average, const std::vector<int64_t>& counted,
                         parallel::ParallelContext& parallel);

class OptimizerStep {
 public:
  OptimizerStep(const config::RunConfig& config, model::TransformerImpl& model, DistributedOptimizer& optimizer,
                parallel::ParallelContext& parallel);

  /// Optimizer step `completed + 1`; `next_batch` is called once per micro-batch of this rank.
  /// Throws when the step is not finite and train.on_nonfinite says stop, or too many were in a
  /// row; nothing of such a step is applied.
  StepResult run(int64_t completed, const std::function<data::Batch()>& next_batch) {
    StepResult result = forward_backward(completed, next_batch);
    apply(completed, result);
    return result;
  }
  /// Its two halves (timed apart by `yuanmoe bench`): up to the global gradient norm, ...
  StepResult forward_backward(int64_t completed, const std::function<data::Batch()>& next_batch);
  /// ... and from the non-finite policy to the routers' updates.
  void apply(int64_t completed, StepResult& result);

  /// The routers' balancing around the step (train/router_balancing.h).
  const RouterBalancing& router_balancing() const { return router_balancing_; }

  /// Micro-batches and tokens of a step, from the config and the data-parallel size.
  const config::DerivedValues& derived() const { return derived_; }

  /// Test seam (tests/integration/train_test.cpp, docs/reliability.md): called in step `step`
  /// (1-based) once the gradients are reduced, before their norm, with the gradients AdamW steps
  /// with (DistributedOptimizer::gradients), e.g. to poison them.
  std::function<void(int64_t step, const std::vector<Tensor>& gradients)> after_reduction;

 private:
  const config::RunConfig& config_;
  model::TransformerImpl& model_;
  DistributedOptimizer& optimizer_;
  parallel::ParallelContext& parallel_;
  RouterBalancing router_balancing_;
  const config::DerivedValues derived_;
  int64_t consecutive_skips_ = 0;
};

}  // namespace yuanmoe::train
