// Per-MoE-layer figures of a whole model from its pipeline stages: each stage fills the rows of
// its own MoE layers, data-parallel ranks add theirs, and every rank gets every layer's sums
// (routed pairs, bias statistics, eval router statistics).
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::train {

class MoeLayerRows {
 public:
  MoeLayerRows(const config::RunConfig& config, const model::StageSpec& stage, const parallel::ParallelContext& parallel);

  /// This stage's rows [L_stage, width] placed at its global MoE layers and summed over the
  /// world: [L, width] of `dtype` on the CPU, undefined when the model has no MoE layer. A
  /// collective: every rank calls it, with undefined rows where its stage has no MoE layer.
  Tensor over_world(const Tensor& stage_rows_LX, int64_t width, torch::Dtype dtype) const;

  /// Global index of this stage's first MoE layer.
  int64_t first_stage_layer() const { return moe_layers_before_stage_; }

 private:
  const parallel::ParallelContext& parallel_;
  int64_t moe_layers_before_stage_ = 0;
  int64_t total_moe_layers_ = 0;
};

}  // namespace yuanmoe::train
