// The gradient arithmetic around AdamW (adamw.h): which parameters decay, the squared gradient
// norm and clipping to a norm. DistributedOptimizer (distributed_optimizer.h) is the one
// optimizer a run has; this room and adamw.h hold what it is made of.
#pragma once

#include <vector>

#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// Weight decay applies to matrices and higher-rank weights (linear, conv, expert, router and
/// embedding weights; the tied embedding is the output head too and is decayed like any matrix,
/// as in nanoGPT and Megatron) and never to vectors (RMSNorm weights, LFA conv biases).
bool uses_weight_decay(const Tensor& parameter);

/// The sum of the squared gradient entries of `parameters` (each tensor's sum of squares
/// accumulated in fp64, then summed over the tensors in order: deterministic, whatever the thread
/// count), left on the device unread: [] fp64, zero on `device` when no parameter has a gradient.
Tensor squared_gradient_sum(const std::vector<Tensor>& parameters, const torch::Device& device);

/// What clipping to max_norm divides every gradient by: (norm + 1e-6) / max_norm when max_norm > 0
/// and norm exceeds it (torch.nn.utils.clip_grad_norm_'s coefficient, inverted), else 1. AdamW
/// applies it inside its kernel (AdamW::step), so clipping costs no pass of its own.
double clip_divisor(double max_norm, double norm);

}  // namespace yuanmoe::train
