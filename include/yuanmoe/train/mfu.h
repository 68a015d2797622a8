// Model FLOPs utilisation (PaLM, arXiv 2204.02311 App. B): achieved model FLOPs / device peak.
// Model FLOPs count forward + backward as 3x the forward of param_count.h (`inspect` uses the
// same formula); recomputation is not counted, so MFU does not reward it.
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// Training FLOPs per token: 3 x forward FLOPs per token at train.seq_length.
double training_flops_per_token(const config::RunConfig& config);

/// The side of the square matmul that measures a device's rate: 8192 on CUDA (an H100/H200 reaches
/// its bf16 rate there, ~790 TFLOP/s measured on an H200), 2048 on the CPU (a second per product
/// on a 2-core VM would make every run slow).
int64_t matmul_rate_size(const torch::Device& device);

/// FLOP/s of back-to-back square matmuls of random operands in `dtype` on `device`, timed with
/// device events on CUDA and the host clock on the CPU.
struct MatmulRate {
  double median = 0.0;  ///< what the device sustains: the peak MFU is quoted against
  double best = 0.0;    ///< the fastest single run; on shared VMs an occasional outlier
  int64_t size = 0;     ///< n of the n x n x n products
};
/// `runs` timed matmuls after one warm-up; about a second on a 2-core CPU.
MatmulRate measure_matmul_rate(torch::Device device, torch::Dtype dtype, int runs = 9);

/// The sustained peak: measure_matmul_rate(...).median. On the project's 2-core VM single runs
/// read ~127 GFLOP/s with sporadic ~190-210 outliers (docs/benchmarks.md), so a best-of-3
/// "peak" would swing MFU by 1.6x between identical runs.
double measure_peak_flops(torch::Device device, torch::Dtype dtype);

}  // namespace yuanmoe::train
