// Parameter counts and forward FLOPs computed from the config alone, so `inspect` can describe
// the 40B model without allocating it (arXiv 2405.17976: 40B total, 3.7B active). Tests check the counts against
// instantiated models.
#pragma once

#include <cstdint>

#include "yuanmoe/config/config.h"

namespace yuanmoe::model {

struct StageSpec;  // transformer.h

/// Parameter elements split by what expert parallelism divides: `expert` = the grouped experts
/// of MoE layers (experts.w1 [E, 2F, D], experts.w2 [E, D, F]), `non_expert` = everything else
/// (attention, LFA, norms, routers, dense FFNs, embedding, head).
struct ParameterCounts {
  int64_t non_expert = 0;
  int64_t expert = 0;
  int64_t total() const { return non_expert + expert; }
};

/// The parameters of global layer `layer_index` (MoE or dense by moe.moe_layer_freq), all E
/// experts counted.
ParameterCounts layer_parameters(const config::ModelConfig& model, const config::MoeConfig& moe,
                                 int64_t layer_index);

/// The parameters a Transformer built for `stage` holds: its layers, the embedding on the first
/// stage, final norm and untied head on the last, and the last stage's own copy of a tied
/// embedding when it is not also the first (transformer.cpp).
ParameterCounts stage_parameters(const config::ModelConfig& model, const config::MoeConfig& moe,
                                 const StageSpec& stage);

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
