// The MoE feed-forward block (arXiv 2405.17976; docs/architecture.md), in Megatron-Core's
// moe_layer shape: route (model/router.h) -> dispatch (model/token_dispatcher.h) -> experts
// (model/experts.h) -> combine. Balancing lives in the router, cross-rank dispatch in the
// dispatcher that parallelism installs; the block keeps no state between forwards.
#pragma once

#include <memory>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/experts.h"
#include "yuanmoe/model/router.h"
#include "yuanmoe/model/token_dispatcher.h"

namespace yuanmoe::model {

struct MoeOutput {
  Tensor out;       // same shape as the input
  Tensor aux_loss;  // weighted router loss of this layer, undefined when none
  // Routed (token, expert) pairs per expert before capacity drops, int64 [E], no grad. Returned
  // rather than accumulated in the module, so a recomputed forward (activation checkpointing)
  // cannot count a batch twice; the trainer sums it over micro-batches.
  Tensor routed_pairs_E;
};

class MoeImpl : public torch::nn::Module {
 public:
  MoeImpl(const config::MoeConfig& config, int64_t hidden_size);
  /// x [..., D] -> out [..., D]. Every token routed counts in the balancing terms, a token whose
  /// label the LM loss ignores too: the experts compute it all the same. The sequence scope reads
  /// the sequences from x's [B, S, D] shape ([T, D]: one sequence).
  MoeOutput forward(const Tensor& x);

  const config::MoeConfig config;
  std::shared_ptr<RouterImpl> gate;  // HF name: mlp.gate
  GroupedExperts experts{nullptr};   // HF names: mlp.experts.{e}.w1 / w2 (this rank's experts)
  /// Local (every expert here) unless parallel::apply_expert_parallel swaps in its all-to-all.
  std::shared_ptr<TokenDispatcher> dispatcher;
};
TORCH_MODULE(Moe);

}  // namespace yuanmoe::model
