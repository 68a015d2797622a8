#include "yuanmoe/train/router_balancing.h"

namespace yuanmoe::train {

RouterBalancing::RouterBalancing(const config::RunConfig& config, model::TransformerImpl& model,
                                 const parallel::ParallelContext& parallel)
    : model_(model),
      layer_rows_(config, model.stage, parallel),
      has_bias_(config.moe.bias_balancing_rate > 0 && config::is_top_k_router(config.moe.router)) {}

void RouterBalancing::begin_step() const {
  for (const model::Moe& moe : model_.moe_layers()) moe->gate->begin_step();
}

Tensor RouterBalancing::stage_bias_statistics() const {
  const std::vector<model::Moe> layers = model_.moe_layers();
  if (!has_bias_ || layers.empty()) return Tensor();
  std::vector<Tensor> rows;
  for (const model::Moe& moe : layers) rows.push_back(moe->gate->step_bias_statistics());
  return torch::stack(rows);
}

void RouterBalancing::update_routers(const Tensor& routed_pairs_LE, const Tensor& bias_statistics_LE1,
                                     double routed_fraction) const {
  const std::vector<model::Moe> layers = model_.moe_layers();
  if (layers.empty() || !routed_pairs_LE.defined()) return;
  model::RouterStepStats stats;
  // ReMoE's L1 coefficient follows the sparsity of all layers together (docs/routers.md); the
  // counts are global, so every rank keeps the same router state.
  stats.active_fraction_all_layers = routed_fraction;
  const torch::Device device = layers.front()->experts->w1.device();
  for (size_t l = 0; l < layers.size(); ++l) {
    const int64_t layer = layer_rows_.first_stage_layer() + static_cast<int64_t>(l);
    // Host to device without waiting: the routers' updates queue behind the step's other work.
    stats.routed_pairs_E = routed_pairs_LE[layer].to(device, /*non_blocking=*/true);
    if (bias_statistics_LE1.defined()) stats.bias_statistics_E1 = bias_statistics_LE1[layer].to(device, /*non_blocking=*/true);
    layers[l]->gate->update_after_step(stats);
  }
}

}  // namespace yuanmoe::train
