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
#include "yuanmoe/train/moe_layer_rows.h"

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
  /// The step's per-layer rows of the whole model, summed over the world (moe_layer_rows.h).
  const MoeLayerRows& layer_rows() const { return layer_rows_; }
  /// Before the optimizer step, from the world's figures of the step (CPU): routed pairs
  /// [L, E], bias statistics [L, E + 1] (undefined without bias), and the fraction of
  /// (token, expert) pairs routed over all MoE layers.
  void update_routers(const Tensor& routed_pairs_LE, const Tensor& bias_statistics_LE1, double routed_fraction) const;

 private:
  model::TransformerImpl& model_;
  MoeLayerRows layer_rows_;
  bool has_bias_ = false;  // moe.bias_balancing_rate > 0 with a top-k router
};

}  // namespace yuanmoe::train
