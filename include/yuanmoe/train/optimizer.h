// AdamW with decoupled weight decay (Loshchilov & Hutter) over two parameter groups, and its
// state keyed by parameter name so a checkpoint survives any change of parameter order, grouping
// or pipeline layout (torch::save(optimizer) keys state by position, which no other layout can read).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "yuanmoe/checkpoint/safetensors.h"
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

/// Group 0: decayed parameters, group 1: the rest (weight_decay 0). Groups keep model order.
std::unique_ptr<torch::optim::AdamW> make_optimizer(const torch::nn::Module& model,
                                                    const config::TrainConfig& train);

/// Sets the learning rate of every group.
void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

/// "{name}/exp_avg", "{name}/exp_avg_sq", "{name}/step" for every parameter that has state
/// (a parameter that never had a gradient, e.g. an expert no token reached yet, has none).
checkpoint::NamedTensors optimizer_state_by_name(const torch::nn::Module& model,
                                                 torch::optim::AdamW& optimizer);

/// Inverse of optimizer_state_by_name. Throws std::runtime_error naming `source` and the tensor
/// when a name is unknown, incomplete, or its shape differs from the parameter's.
void load_optimizer_state_by_name(const torch::nn::Module& model,
                                  torch::optim::AdamW& optimizer,
                                  const checkpoint::NamedTensors& state,
                                  const std::string& source);

/// The L2 norm of all gradients (fp64 accumulation, fixed order: deterministic), and when
/// max_norm > 0 and the norm exceeds it, every gradient scaled by max_norm / norm.
double clip_gradients(const std::vector<Tensor>& parameters, double max_norm);

/// The two halves of clip_gradients, for a norm summed across pipeline stages in between:
/// the sum of squared gradient entries (fp64), and the scaling given the global norm.
double squared_gradient_norm(const std::vector<Tensor>& parameters);
/// The same sum left on the gradients' device, unread: [] fp64 (zero on `device` when no
/// parameter has a gradient).
Tensor squared_gradient_sum(const std::vector<Tensor>& parameters, const torch::Device& device);
void scale_gradients_to_norm(const std::vector<Tensor>& parameters, double max_norm, double norm);

}  // namespace yuanmoe::train
