// The language-model loss: mean next-token cross-entropy, computed in fp32 whatever the
// activation dtype (Megatron keeps the cross-entropy in fp32 under bf16).
#pragma once

#include "yuanmoe/core/types.h"
#include "yuanmoe/data/sampler.h"

namespace yuanmoe::train {

/// The label whose prediction does not count (ignore_index): an SFT sample's instruction.
using data::kIgnoredLabel;

/// logits_BSV (any float dtype), labels_BS int64 -> scalar fp32 (or fp64 for fp64 logits): the
/// mean over the labels that are not kIgnoredLabel; 0 when every label is ignored.
/// overwrite_logits: the caller reads the logits no more, and the loss may keep its softmax
/// terms in their memory (the train step's; the logits are no autograd input of anything else).
Tensor language_model_loss(const Tensor& logits_BSV, const Tensor& labels_BS, bool overwrite_logits = false);

/// Labels that count (are not kIgnoredLabel), read from host memory: labels on the CPU, as the
/// samplers make them (no wait for a device).
int64_t counted_labels(const Tensor& labels);

}  // namespace yuanmoe::train
