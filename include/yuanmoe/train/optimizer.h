// AdamW's settings and the gradient arithmetic around it: decoupled weight decay (Loshchilov &
// Hutter) over two parameter groups, the squared gradient norm and clipping to a norm.
// DistributedOptimizer (distributed_optimizer.h) is the one optimizer a run has; this room holds
// what it is made of.
#pragma once

#include <memory>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// Weight decay applies to matrices and higher-rank weights (linear, conv, expert, router and
/// embedding weights; the tied embedding is the output head too and is decayed like any matrix,
/// as in nanoGPT and Megatron) and never to vectors (RMSNorm weights, LFA conv biases).
bool uses_weight_decay(const Tensor& parameter);

/// AdamW with train's settings over two groups: `decayed` (train.weight_decay) and
/// `not_decayed` (weight_decay 0), either possibly empty.
std::unique_ptr<torch::optim::AdamW> make_adamw(std::vector<Tensor> decayed, std::vector<Tensor> not_decayed,
                                                const config::TrainConfig& train);

/// Sets the learning rate of every group.
void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

/// The sum of the squared gradient entries of `parameters` (fp64, one sum per tensor then one
/// over the tensors in order: deterministic), left on the device unread: [] fp64, zero on
/// `device` when no parameter has a gradient.
Tensor squared_gradient_sum(const std::vector<Tensor>& parameters, const torch::Device& device);

/// When max_norm > 0 and norm exceeds it, every gradient scaled by max_norm / norm.
void scale_gradients_to_norm(const std::vector<Tensor>& parameters, double max_norm, double norm);

}  // namespace yuanmoe::train
