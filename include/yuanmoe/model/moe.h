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

class MoeImpl : public torch::nn::Module {
 public:
  MoeImpl(const config::MoeConfig& config, int64_t hidden_size);
  /// x [..., D] -> out [..., D].
  MoeOutput forward(const Tensor& x);

  const config::MoeConfig config;
  std::shared_ptr<RouterImpl> gate;  // HF name: mlp.gate
  GroupedExperts experts{nullptr};   // HF names: mlp.experts.{e}.w1 / w2
};
TORCH_MODULE(Moe);

}  // namespace yuanmoe::model
