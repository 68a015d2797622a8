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

/// Where the values are drawn. kCpu: on the CPU in fp32 from a CPU generator, then copied: the
/// same values on every device and machine (training, checkpoints, tests). kParameterDevice: on the
/// device each parameter lives on, from that device's generator seeded the same way; on CUDA the
/// values differ from the CPU's (another generator), and the draw takes seconds instead of the CPU's
/// minute for a 5B-parameter model. `yuanmoe bench` draws there: it times steps, not values.
enum class InitDraw { kCpu, kParameterDevice };

void init_weights(torch::nn::Module& model, const config::ModelConfig& config, uint64_t seed = 1234,
                  InitDraw draw = InitDraw::kCpu);

}  // namespace yuanmoe::model
