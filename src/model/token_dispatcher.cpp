#include "yuanmoe/model/token_dispatcher.h"

#include "yuanmoe/core/lane_sum.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
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

/// Rows one CPU task handles (tokens forward, pairs backward): a few hundred values each, enough
/// to amortise a task.
constexpr int64_t kRowsPerTask = 64;

/// The hand-written CPU path: contiguous fp32 or fp64 rows on the host.
bool fused_on_cpu(const Tensor& rows_ND) {
  return rows_ND.device().is_cpu() && rows_ND.is_contiguous() &&
         (rows_ND.scalar_type() == torch::kFloat || rows_ND.scalar_type() == torch::kDouble);
}

/// The row of pair_ids_N that holds each (token, slot) pair, -1 for a pair that is not computed
/// (a zero ReLU gate, a capacity drop): int64 [T * K].
Tensor slot_positions_P(const Tensor& pair_ids_N, int64_t pairs) {
  return torch::full({pairs}, -1, pair_ids_N.options())
      .index_copy_(0, pair_ids_N, torch::arange(pair_ids_N.size(0), pair_ids_N.options()));
}

/// out[t] = sum over the slots k of token t, in slot order, of rows[p] * scale[p] (rows[p] without
/// scale), p = position[t K + k]; absent pairs add nothing. One pass over the rows in place of
/// ATen's (rows * scale) -> index_copy into zeros -> sum(1), with its bits for two slots (one
/// addition); with more, ATen sums the slots in interleaved partial sums and this in slot order.
template <typename scalar_t>
void sum_slots(const Tensor& position_P, int64_t slots, const Tensor& rows_ND, const Tensor& scale_N, Tensor& out_TD) {
  const int64_t tokens = out_TD.size(0), hidden = out_TD.size(1);
  const int64_t* position = position_P.const_data_ptr<int64_t>();
  const scalar_t* rows = rows_ND.const_data_ptr<scalar_t>();
  const scalar_t* scale = scale_N.defined() ? scale_N.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = out_TD.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      scalar_t* __restrict dst = out + t * hidden;
      std::fill(dst, dst + hidden, scalar_t{0});
      for (int64_t k = 0; k < slots; ++k) {
        const int64_t p = position[t * slots + k];
        if (p < 0) continue;
        const scalar_t* __restrict src = rows + p * hidden;
        if (scale == nullptr) {
          for (int64_t d = 0; d < hidden; ++d) dst[d] += src[d];
        } else {
          const scalar_t g = scale[p];
          for (int64_t d = 0; d < hidden; ++d) dst[d] += src[d] * g;
        }
      }
    }
  });
}

/// combine_pairs() on the CPU: out_TD = sum over each token's slots of gate * ys, in one pass,
/// and its backward in one pass over the pairs: d_ys[p] = gate[p] d_out[t(p)] and
/// d_gate[p] = <d_out[t(p)], ys[p]>. ATen's composition of the same (scale, index_copy into
/// zeros, sum; and their backward) takes about ten operators and three [N, D] temporaries.
struct CombinePairsCpu : public torch::autograd::Function<CombinePairsCpu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& ys_ND, const Tensor& gates_N,
                               const Tensor& pair_ids_N, int64_t tokens, int64_t slots) {
    RECORD_FUNCTION("yuanmoe::combine_pairs", std::vector<c10::IValue>{});
    const Tensor ys = ys_ND.detach(), gates = gates_N.detach().contiguous();
    const Tensor position_P = slot_positions_P(pair_ids_N, tokens * slots);
    Tensor out_TD = torch::empty({tokens, ys.size(1)}, ys.options());
    AT_DISPATCH_FLOATING_TYPES(ys.scalar_type(), "combine_pairs_cpu",
                               [&] { sum_slots<scalar_t>(position_P, slots, ys, gates, out_TD); });
    ctx->save_for_backward({ys, gates, pair_ids_N});
    ctx->saved_data["slots"] = slots;
    return {out_TD};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &ys = saved[0], &gates = saved[1], &pair_ids_N = saved[2];
    const int64_t slots = ctx->saved_data["slots"].toInt();
    const Tensor d_out_TD = grad_outputs[0].contiguous();
    const int64_t pairs = ys.size(0), hidden = ys.size(1);
    Tensor d_ys_ND = torch::empty_like(ys), d_gates_N = torch::empty_like(gates);
    AT_DISPATCH_FLOATING_TYPES(ys.scalar_type(), "combine_pairs_cpu_backward", [&] {
      const scalar_t* y = ys.const_data_ptr<scalar_t>();
      const scalar_t* g = gates.const_data_ptr<scalar_t>();
      const scalar_t* d_out = d_out_TD.const_data_ptr<scalar_t>();
      const int64_t* pair_id = pair_ids_N.const_data_ptr<int64_t>();
      scalar_t* d_y = d_ys_ND.data_ptr<scalar_t>();
      scalar_t* d_g = d_gates_N.data_ptr<scalar_t>();
      at::parallel_for(0, pairs, kRowsPerTask, [&](int64_t first, int64_t last) {
        for (int64_t p = first; p < last; ++p) {
          const scalar_t* __restrict d_row = d_out + (pair_id[p] / slots) * hidden;
          scalar_t* __restrict d_y_row = d_y + p * hidden;
          for (int64_t d = 0; d < hidden; ++d) d_y_row[d] = d_row[d] * g[p];
          d_g[p] = lane_dot(d_row, y + p * hidden, hidden);
        }
      });
    });
    return {d_ys_ND, d_gates_N, Tensor(), Tensor(), Tensor()};
  }
};

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
    if (fused_on_cpu(d_xs_ND)) {
      Tensor d_x_TD = torch::empty({tokens, hidden}, d_xs_ND.options());
      const Tensor position_P = slot_positions_P(pair_ids_N, tokens * slots);
      AT_DISPATCH_FLOATING_TYPES(d_xs_ND.scalar_type(), "gather_pairs_cpu_backward",
                                 [&] { sum_slots<scalar_t>(position_P, slots, d_xs_ND, Tensor(), d_x_TD); });
      return {d_x_TD, Tensor(), Tensor()};
    }
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
  if (fused_on_cpu(ys_ND)) {
    return CombinePairsCpu::apply(ys_ND, plan.gates_N.to(ys_ND.scalar_type()), plan.pair_ids_N, plan.tokens,
                                  plan.slots)[0];
  }
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
