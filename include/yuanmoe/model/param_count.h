// Parameter counts and forward FLOPs computed from the config alone, so `inspect` can describe
// the 40B model without allocating it (arXiv 2405.17976: 40B total, 3.7B active). Tests check the counts against
// instantiated models.
#pragma once

#include <cstdint>

#include "yuanmoe/config/config.h"

namespace yuanmoe::model {

struct ModelSize {
  int64_t total_parameters = 0;
  /// Parameters touched by one token: non-expert weights plus top_k experts per MoE layer
  /// (all experts for the dense router; the ReLU router's target average, top_k).
  int64_t active_parameters = 0;
  /// Forward FLOPs per token at the given sequence length: 2 per multiply-add of every active
  /// weight matrix (the tied head counted once), plus causal attention scores and weighted sum
  /// 2 * S * P per layer (the causal half, as llm.c counts: the fused kernels skip the future,
  /// and PaLM's full 4 * S * P would credit work never done), plus the attention router's E x E
  /// products.
  int64_t forward_flops_per_token = 0;
};

ModelSize model_size(const config::ModelConfig& model, const config::MoeConfig& moe, int64_t seq_length);

}  // namespace yuanmoe::model
