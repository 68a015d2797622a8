// The model's view of a micro-batch (model::TokenLayout) from the sampler's batch, the same on the
// train, eval and bench paths and on every pipeline stage (each stage reads its own copy of the
// micro-batch, docs/parallelism.md).
#pragma once

#include "yuanmoe/core/types.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::train {

/// On `device`: the batch's position ids and its document ids when it has them
/// (data.reset_attention_mask) and some row holds more than one document (one document per row
/// is the plain causal layout: the same logits, a faster kernel). The labels are the loss's
/// alone: the model routes, balances and attends over every token, an ignored label's included.
model::TokenLayout token_layout(const data::Batch& batch, const torch::Device& device);

}  // namespace yuanmoe::train
