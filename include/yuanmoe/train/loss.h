// The language-model loss: mean next-token cross-entropy, computed in fp32 whatever the
// activation dtype (Megatron keeps the cross-entropy in fp32 under bf16).
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// The label of a token whose prediction does not count (PyTorch's and Hugging Face's
/// ignore_index): padding, prompt tokens of a fine-tune.
constexpr int64_t kIgnoredLabel = -100;

/// logits_BSV (any float dtype), labels_BS int64 -> scalar fp32 (or fp64 for fp64 logits): the
/// mean over the labels that are not kIgnoredLabel; 0 when every label is ignored.
Tensor language_model_loss(const Tensor& logits_BSV, const Tensor& labels_BS);

}  // namespace yuanmoe::train
