// The routers' balancing around an optimizer step (docs/routers.md), a pre-step hook of
// train/step.h: every router's step statistics reset before the first micro-batch; after the
// backward passes this stage's rows (routed pairs, bias statistics) gathered over the world; and
// before the optimizer step each router updated from the world's sums (the aux-loss-free bias,
// ReMoE's L1 coefficient), so that every rank keeps the same router state.
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::train {

class RouterBalancing {
 public:
  RouterBalancing(const config::RunConfig& config, model::TransformerImpl& model,
                  const parallel::ParallelContext& parallel);

  /// Before the step's first micro-batch.
  void begin_step() const;
  /// Whether the routers keep bias statistics (the same answer on every rank).
  bool has_bias() const { return has_bias_; }
  /// This stage's bias statistics of the step, fp64 [L_stage, E + 1] on the device; undefined
  /// without bias or MoE layers on this stage.
  Tensor stage_bias_statistics() const;
  /// This stage's rows [L_stage, width] placed at its global MoE layers and summed over the world
  /// (stages fill their rows, data-parallel ranks add): [total MoE layers, width] on the CPU,
  /// undefined without MoE layers. A collective.
  Tensor world_rows(const Tensor& stage_rows_LX, int64_t width, torch::Dtype dtype) const;
  /// Before the optimizer step, from the world's figures of the step (CPU): routed pairs
  /// [L, E], bias statistics [L, E + 1] (undefined without bias), and the fraction of
  /// (token, expert) pairs routed over all MoE layers.
  void update_routers(const Tensor& routed_pairs_LE, const Tensor& bias_statistics_LE1, double routed_fraction) const;

 private:
  model::TransformerImpl& model_;
  const parallel::ParallelContext& parallel_;
  int64_t moe_layers_before_stage_ = 0;  // global index of this stage's first MoE layer
  int64_t total_moe_layers_ = 0;
  bool has_bias_ = false;  // moe.bias_balancing_rate > 0 with a top-k router
};

}  // namespace yuanmoe::train
