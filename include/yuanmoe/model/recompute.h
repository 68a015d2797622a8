// Activation recomputation of whole blocks (Megatron "full" recompute, Chen et al. 2016,
// arXiv 1604.06174): the forward keeps only the block's input; backward reruns the block with
// grad enabled and backpropagates through it (PyTorch's reentrant torch.utils.checkpoint). The
// CPU/CUDA RNG states and the autocast state of the first run are restored for the rerun, so
// dropout masks and bf16 casts are identical and gradients equal those without recompute.
#pragma once

#include "yuanmoe/core/types.h"
#include "yuanmoe/model/block.h"

namespace yuanmoe::model {

/// Same result as block->forward(x_BSD, position_ids_BS), storing no activations inside the block.
BlockOutput recompute_block(TransformerBlockImpl& block, const Tensor& x_BSD, const Tensor& position_ids_BS);

}  // namespace yuanmoe::model
