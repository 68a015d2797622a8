// Model FLOPs utilisation (PaLM, arXiv 2204.02311 App. B): achieved model FLOPs / device peak.
// Model FLOPs count forward + backward as 3x the forward of param_count.h (`inspect` uses the
// same formula); recomputation is not counted, so MFU does not reward it.
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// Training FLOPs per token: 3 x forward FLOPs per token at train.seq_length.
double training_flops_per_token(const config::RunConfig& config);

/// Best of a few large square matmuls (n = 2048) in `dtype` on `device`, FLOP/s. Takes well
/// under a second on a laptop CPU.
double measure_peak_flops(torch::Device device, torch::Dtype dtype);

}  // namespace yuanmoe::train
