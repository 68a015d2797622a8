// The language-model loss: mean next-token cross-entropy, computed in fp32 whatever the
// activation dtype (Megatron keeps the cross-entropy in fp32 under bf16).
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// logits_BSV (any float dtype), labels_BS int64 -> scalar fp32 (or fp64 for fp64 logits).
Tensor language_model_loss(const Tensor& logits_BSV, const Tensor& labels_BS);

}  // namespace yuanmoe::train
