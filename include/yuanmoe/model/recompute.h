// Activation recomputation of whole blocks (Megatron "full" recompute, Chen et al. 2016,
// arXiv 1604.06174), applied to a model from outside: the forward keeps only each block's input;
// backward reruns the block with grad enabled and backpropagates through it (PyTorch's reentrant
// torch.utils.checkpoint). The rerun restores the first run's CPU generator, the generator of the
// block's CUDA device, and the autocast state of CPU and CUDA, so dropout masks and bf16 casts are
// identical and gradients equal those without recompute.
#pragma once

#include "yuanmoe/core/types.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {

/// Same result as block->forward(x_BSD, tokens), storing no activations inside the block; the
/// rerun in backward gets the same layout (positions, document ids).
BlockOutput recompute_block(TransformerBlockImpl& block, const Tensor& x_BSD, const TokenLayout& tokens);

/// train.recompute: every block of `model` recomputed in backward (off: blocks run plainly).
void apply_recompute(TransformerImpl& model, bool enabled);

}  // namespace yuanmoe::model
