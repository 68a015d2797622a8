// The one initialisation policy (Megatron-LM's init_method_normal and scaled_init_method_normal):
//   RMSNorm weights 1; LFA conv weights and biases U(+-1/sqrt(fan_in)) (PyTorch Conv2d default,
//   fan_in = in_channels * 2); output projections (o_proj, w2) N(0, init_std / sqrt(2 L));
//   everything else (embedding, q/k/v, routers, w1, untied head) N(0, init_std).
// Each parameter is drawn from its own generator seeded by (seed, its name), so a pipeline stage
// gets exactly the values the whole model has under those names, whatever the layout.
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

void init_weights(torch::nn::Module& model, const config::ModelConfig& config, uint64_t seed = 1234);

}  // namespace yuanmoe::model
