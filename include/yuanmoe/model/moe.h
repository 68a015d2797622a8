// The MoE feed-forward block (yuan2-m32.md §6, distributed.md §4): route, group the routed
// (token, slot) pairs by expert with a stable sort, run one contiguous GEMM pair per expert,
// scale by the gates, and combine deterministically: every pair writes its own (token, slot)
// row (unique destinations, no atomics) and the K slots are summed in a fixed order.
// Dropless by default; capacity_factor > 0 drops the overflow of each expert in batch order.
#pragma once

#include <memory>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/mlp.h"
#include "yuanmoe/model/router.h"

namespace yuanmoe::model {

struct MoeOutput {
  Tensor out;       // same shape as the input
  Tensor aux_loss;  // weighted router loss of this layer, undefined when none
  // Routed (token, expert) pairs per expert before capacity drops, int64 [E], no grad. Returned
  // rather than accumulated in the module, so a recomputed forward (activation checkpointing)
  // cannot count a batch twice; the trainer sums it over micro-batches.
  Tensor pairs_per_expert_E;
};

/// Where each routed (token, slot) pair goes: the pairs that are computed, grouped by expert.
/// Pair p is slot p % K of token p / K.
struct DispatchPlan {
  Tensor pair_ids_N;                   // int64 [N], sorted by expert, batch order inside an expert
  Tensor gates_N;                      // [N], the gate of each pair in that order
  std::vector<int64_t> rows_per_expert;  // [E] on the host: it sizes the expert GEMMs
  Tensor routed_pairs_E;               // int64 [E] pairs the router asked for, before capacity drops
  int64_t tokens = 0, slots = 0;
};

class MoeImpl : public torch::nn::Module {
 public:
  MoeImpl(const config::MoeConfig& config, int64_t hidden_size);
  /// x [..., D] -> out [..., D]: route, plan, gather, experts, combine.
  MoeOutput forward(const Tensor& x);

  // The stages of forward(), public so that `yuanmoe bench` can time each one.
  DispatchPlan plan(const Routing& routing, int64_t tokens) const;
  /// x_TD -> the planned pairs' inputs [N, D].
  static Tensor gather(const Tensor& x_TD, const DispatchPlan& plan);
  /// Expert outputs [N, D] -> out [T, D]: scaled by the gates, each pair written to its own
  /// (token, slot) row, the K slots summed in order.
  static Tensor combine(const Tensor& ys_ND, const DispatchPlan& plan);

  const config::MoeConfig config;
  std::shared_ptr<RouterImpl> gate;  // HF name: mlp.gate
  GroupedExperts experts{nullptr};   // HF names: mlp.experts.{e}.w1 / w2
};
TORCH_MODULE(Moe);

}  // namespace yuanmoe::model
