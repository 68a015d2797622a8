#include "yuanmoe/model/token_dispatcher.h"

#include <cmath>
#include <torch/csrc/autograd/custom_function.h>

namespace yuanmoe::model {

DispatchPlan plan_dispatch(const Routing& routing, int64_t tokens, const config::MoeConfig& config, bool host_counts) {
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
  auto [sorted_experts_N, order_N] = torch::sort(expert_ids_N, /*stable=*/c10::optional<bool>(true), /*dim=*/0);
  // Pairs per expert from the sorted ids (bincount would read the largest id back to the host on
  // CUDA to size its output: a synchronisation).
  const Tensor expert_ids_E = torch::arange(experts_count, expert_ids_N.options());
  Tensor expert_rows_E = torch::searchsorted(sorted_experts_N, expert_ids_E, /*out_int32=*/false, /*right=*/true) -
                         torch::searchsorted(sorted_experts_N, expert_ids_E, /*out_int32=*/false, /*right=*/false);
  DispatchPlan result;
  result.routed_pairs_E = expert_rows_E;  // before drops: what the router asked for
  if (config.capacity_factor > 0) {
    // docs/routers.md: C = ceil(cf * T * k / E); later pairs of an overfull expert are dropped and
    // the residual carries their token unchanged.
    const auto capacity = static_cast<int64_t>(std::ceil(
        config.capacity_factor * static_cast<double>(tokens * slots) / experts_count));
    const Tensor expert_start_E = expert_rows_E.cumsum(0) - expert_rows_E;
    const Tensor rank_in_expert_N = torch::arange(order_N.size(0), order_N.options()) -
                                    expert_start_E.index_select(0, sorted_experts_N);
    order_N = order_N.masked_select(rank_in_expert_N < capacity);
    expert_rows_E = expert_rows_E.clamp_max(capacity);
  }

  result.expert_offsets_E = expert_rows_E.cumsum(0).to(torch::kInt);
  if (host_counts) {
    // The loop's one host sync per layer: the per-expert row counts drive its GEMMs.
    const Tensor counts_cpu = expert_rows_E.to(torch::kCPU).contiguous();
    result.rows_per_expert.assign(counts_cpu.data_ptr<int64_t>(), counts_cpu.data_ptr<int64_t>() + experts_count);
  }
  result.pair_ids_N = pair_ids_N.index_select(0, order_N);
  result.gates_N = gates_N.index_select(0, order_N);
  result.tokens = tokens;
  result.slots = slots;
  return result;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// xs_ND = x_TD[pair_N / K] with a backward without atomics: index_select's own backward is an
/// index_add over duplicate token ids, whose float atomics on CUDA sum in a varying order. Here
/// each pair's gradient goes to its own (token, slot) row (unique: index_copy) and the K slots
/// are summed in slot order, as combine_pairs() does forward: the same bits on every run and device.
struct GatherPairs : public torch::autograd::Function<GatherPairs> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_TD, const Tensor& pair_ids_N, int64_t slots) {
    ctx->save_for_backward({pair_ids_N});
    ctx->saved_data["slots"] = slots;
    ctx->saved_data["tokens"] = x_TD.size(0);
    return {x_TD.index_select(0, torch::div(pair_ids_N, slots, "floor"))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor pair_ids_N = ctx->get_saved_variables()[0];
    const int64_t slots = ctx->saved_data["slots"].toInt(), tokens = ctx->saved_data["tokens"].toInt();
    const Tensor& d_xs_ND = grad_outputs[0];
    const int64_t hidden = d_xs_ND.size(1);
    const Tensor slot_rows = torch::zeros({tokens * slots, hidden}, d_xs_ND.options());  // [T * K, D]
    const Tensor d_x_TD =
        torch::index_copy(slot_rows, 0, pair_ids_N, d_xs_ND).view({tokens, slots, hidden}).sum(1);
    return {d_x_TD, Tensor(), Tensor()};
  }
};

}  // namespace

Tensor gather_pairs(const Tensor& x_TD, const DispatchPlan& plan) {
  return GatherPairs::apply(x_TD, plan.pair_ids_N, plan.slots)[0];
}

Tensor combine_pairs(const Tensor& ys_ND, const DispatchPlan& plan) {
  const Tensor scaled_ND = ys_ND * plan.gates_N.unsqueeze(1).to(ys_ND.scalar_type());
  const int64_t hidden = ys_ND.size(1);
  const Tensor slot_rows = torch::zeros({plan.tokens * plan.slots, hidden}, ys_ND.options());
  return torch::index_copy(slot_rows, 0, plan.pair_ids_N, scaled_ND).view({plan.tokens, plan.slots, hidden}).sum(1);
}

ExpertInput LocalTokenDispatcher::dispatch(const Tensor& x_TD, const Routing& routing, bool host_counts) {
  plan_ = plan_dispatch(routing, x_TD.size(0), config_, host_counts);
  return {gather_pairs(x_TD, plan_), plan_.rows_per_expert, plan_.expert_offsets_E};
}

}  // namespace yuanmoe::model
