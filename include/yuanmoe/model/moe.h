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
};

/// Routed pairs per expert (before capacity drops) and tokens, accumulated in training mode.
struct ExpertLoad {
  Tensor pairs_per_expert_E;  // int64 [E]
  int64_t tokens = 0;
};

class MoeImpl : public torch::nn::Module {
 public:
  MoeImpl(const config::MoeConfig& config, int64_t hidden_size);
  /// x [..., D] -> out [..., D].
  MoeOutput forward(const Tensor& x);
  /// Returns the load accumulated since the last call and starts a new count.
  ExpertLoad take_load();

  const config::MoeConfig config;
  std::shared_ptr<RouterImpl> gate;  // HF name: mlp.gate
  GroupedExperts experts{nullptr};   // HF names: mlp.experts.{e}.w1 / w2

 private:
  ExpertLoad load_;
};
TORCH_MODULE(Moe);

}  // namespace yuanmoe::model
