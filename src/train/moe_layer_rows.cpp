#include "yuanmoe/train/moe_layer_rows.h"

namespace yuanmoe::train {

MoeLayerRows::MoeLayerRows(const config::RunConfig& config, const model::StageSpec& stage,
                           const parallel::ParallelContext& parallel)
    : parallel_(parallel),
      moe_layers_before_stage_(model::count_moe_layers(config.moe, 0, stage.first_layer)),
      total_moe_layers_(model::count_moe_layers(config.moe, 0, config.model.num_layers)) {}

Tensor MoeLayerRows::over_world(const Tensor& stage_rows_LX, int64_t width, torch::Dtype dtype) const {
  if (total_moe_layers_ == 0) return Tensor();
  Tensor all = torch::zeros({total_moe_layers_, width}, dtype);  // [L, width]
  if (stage_rows_LX.defined()) all.narrow(0, moe_layers_before_stage_, stage_rows_LX.size(0)).copy_(stage_rows_LX);
  parallel_.world_group.all_reduce_sum(all);
  return all;
}

}  // namespace yuanmoe::train
