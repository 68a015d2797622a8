#include "yuanmoe/model/moe.h"

#include <cmath>

namespace yuanmoe::model {

MoeImpl::MoeImpl(const config::MoeConfig& config, int64_t hidden_size) : config(config) {
  gate = register_module("gate", make_router(config, hidden_size));
  experts = register_module(
      "experts", GroupedExperts(config.num_experts, hidden_size, config.ffn_hidden_size));
}

MoeOutput MoeImpl::forward(const Tensor& x) {
  const Tensor x_TD = x.reshape({-1, x.size(-1)});
  const Routing routing = gate->forward(x_TD);
  const DispatchPlan dispatch = plan(routing, x_TD.size(0));
  const Tensor ys_ND = experts->forward(gather(x_TD, dispatch), dispatch.rows_per_expert);
  return {combine(ys_ND, dispatch).view(x.sizes()), routing.aux_loss, dispatch.routed_pairs_E};
}

DispatchPlan MoeImpl::plan(const Routing& routing, int64_t tokens) const {
  const int64_t slots = routing.expert_ids_TK.size(1), experts_count = config.num_experts;
  Tensor pair_ids_N = torch::arange(tokens * slots, routing.expert_ids_TK.options());
  Tensor expert_ids_N = routing.expert_ids_TK.reshape(-1);
  Tensor gates_N = routing.gates_TK.reshape(-1);
  if (routing.skip_zero_gates) {
    pair_ids_N = torch::nonzero(gates_N).squeeze(1);
    expert_ids_N = expert_ids_N.index_select(0, pair_ids_N);
    gates_N = gates_N.index_select(0, pair_ids_N);
  }

  // Stable: inside an expert, pairs keep batch order (deterministic; capacity drops by position).
  Tensor order_N = std::get<1>(torch::sort(expert_ids_N, /*stable=*/c10::optional<bool>(true), /*dim=*/0));
  Tensor pairs_per_expert_E = torch::bincount(expert_ids_N, /*weights=*/{}, experts_count);
  DispatchPlan result;
  result.routed_pairs_E = pairs_per_expert_E;  // before drops: what the router asked for
  if (config.capacity_factor > 0) {
    // routers.md §9: C = ceil(cf * T * k / E); later pairs of an overfull expert are dropped and
    // the residual carries their token unchanged.
    const auto capacity = static_cast<int64_t>(std::ceil(
        config.capacity_factor * static_cast<double>(tokens * slots) / experts_count));
    const Tensor sorted_experts_N = expert_ids_N.index_select(0, order_N);
    const Tensor expert_start_E = pairs_per_expert_E.cumsum(0) - pairs_per_expert_E;
    const Tensor rank_in_expert_N = torch::arange(order_N.size(0), order_N.options()) -
                                    expert_start_E.index_select(0, sorted_experts_N);
    order_N = order_N.masked_select(rank_in_expert_N < capacity);
    pairs_per_expert_E = pairs_per_expert_E.clamp_max(capacity);
  }

  // The only host sync of the layer: the per-expert row counts drive the GEMM loop.
  const Tensor counts_cpu = pairs_per_expert_E.to(torch::kCPU).contiguous();
  result.rows_per_expert.assign(counts_cpu.data_ptr<int64_t>(), counts_cpu.data_ptr<int64_t>() + experts_count);
  result.pair_ids_N = pair_ids_N.index_select(0, order_N);
  result.gates_N = gates_N.index_select(0, order_N);
  result.tokens = tokens;
  result.slots = slots;
  return result;
}

Tensor MoeImpl::gather(const Tensor& x_TD, const DispatchPlan& plan) {
  return x_TD.index_select(0, torch::div(plan.pair_ids_N, plan.slots, "floor"));
}

Tensor MoeImpl::combine(const Tensor& ys_ND, const DispatchPlan& plan) {
  const Tensor scaled_ND = ys_ND * plan.gates_N.unsqueeze(1).to(ys_ND.scalar_type());
  const int64_t hidden = ys_ND.size(1);
  const Tensor slot_rows = torch::zeros({plan.tokens * plan.slots, hidden}, ys_ND.options());
  return torch::index_copy(slot_rows, 0, plan.pair_ids_N, scaled_ND).view({plan.tokens, plan.slots, hidden}).sum(1);
}

}  // namespace yuanmoe::model
