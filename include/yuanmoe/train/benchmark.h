// `yuanmoe bench`: what a config's training step costs on this machine, measured in one process
// so that every figure is comparable with the others of the same run (docs/benchmarks.md).
//
//   step        the trainer's own step functions (run_pipeline_step, gradient clipping, AdamW)
//               on random tokens from host memory: tokens/s, and MFU against a matmul peak measured
//               in the run (n^3 in the step's dtype, n = 8192 on CUDA) and against log.peak_tflops
//   components  each forward stage timed alone on the shapes of one micro-batch, with autograd
//               recording as in training, scaled to one optimizer step (x layers x micro-batches);
//               backward = (forward + backward) - forward; optimizer = clip + AdamW
//   pairs       side by side, interleaved A B A B, under the step's precision (bf16 autocast on a
//               GPU): the MoE block vs a dense SwiGLU FFN of the same active FLOPs (width top_k x F),
//               _grouped_mm vs the per-expert loop, and SDPA vs materialised attention, fwd + bwd
//   memory      the process's peak resident set (getrusage)
//   profile     with --profile, one more step's operator trace (Kineto), for bench/profile_step.py
// Medians of repeated runs; no figure here is a test threshold.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

struct BenchOptions {
  int64_t steps = 5;    ///< timed optimizer steps
  int64_t warmup = 1;   ///< untimed steps first (allocator, BLAS buffers)
  int64_t repeats = 7;  ///< runs per component / pair timing (median)
  bool step_only = false;  ///< skip components and pairs (memory-vs-length runs)
  /// Micro-batches from data.train_prefix (the trainer's sampler) instead of random tokens:
  /// trained weights route real text unlike random tokens (docs/benchmarks.md).
  bool real_data = false;
  /// Non-empty: measure only this causal attention kernel ("sdpa", "materialised"),
  /// forward + backward on one micro-batch's [B, H, S, Dh], and the memory it adds.
  std::string attention_kernel;
  /// Non-empty: one more step after the timed ones under LibTorch's Kineto profiler (CPU
  /// operators; CUDA kernels on a GPU), saved here as a Chrome trace (bench/profile_step.py sums
  /// it per operator, forward and backward apart). Its time is in no other figure.
  std::string profile_path;
};

/// One attention kernel alone (BenchOptions::attention_kernel). One kernel per process, so that
/// the peak resident set belongs to it.
struct AttentionKernelTime {
  std::string kernel;
  int64_t batch = 0, heads = 0, seq = 0, head_dim = 0;
  double seconds = 0.0;          ///< forward + backward, median of `repeats`
  int64_t peak_extra_bytes = 0;  ///< peak resident set above the resident set before the first call
};

struct ComponentTime {
  std::string name;
  double seconds = 0.0;  ///< per optimizer step
};

struct PairTime {
  std::string name, a, b;
  double a_seconds = 0.0, b_seconds = 0.0;  ///< forward + backward, median
};

struct BenchReport {
  std::string device;
  int threads = 0;
  std::string torch_version;
  std::string precision;             ///< train.precision: the step's, the parts' and the pairs'
  std::string init_from;             ///< checkpoint whose weights were measured (train.init_from); empty = random init
  std::string data;                  ///< the dataset the batches came from; empty = random tokens
  double peak_flops = 0.0;           ///< MFU denominator: log.peak_tflops if set, else measured_peak_flops
  double best_matmul_flops = 0.0;    ///< the fastest single matmul seen (for reference; MFU does not use it)
  /// Sustained rate of n^3 matmuls in the step's dtype (n = matmul_size, mfu.h), the higher of before
  /// and after the steps.
  double measured_peak_flops = 0.0;
  int64_t matmul_size = 0;
  double flops_per_token = 0.0;      ///< training: 3 x forward (mfu.h)
  int64_t tokens_per_step = 0;
  std::vector<double> step_seconds;  ///< timed steps
  double step_median_seconds = 0.0;
  double tokens_per_s = 0.0;
  double mfu = 0.0;                  ///< against peak_flops
  double mfu_measured_peak = 0.0;    ///< against measured_peak_flops
  double mfu_stated_peak = 0.0;      ///< against log.peak_tflops; 0 when the key is not set
  std::vector<double> losses;        ///< every step's loss, warm-up included
  std::vector<ComponentTime> components;
  double forward_seconds = 0.0;      ///< measured whole forward (+ loss) per step
  std::vector<PairTime> pairs;
  std::optional<AttentionKernelTime> attention_kernel;  ///< only that was measured when set
  int64_t peak_rss_bytes = 0;
  int64_t peak_device_bytes = 0;     ///< peak CUDA memory allocated (the caching allocator's statistic); 0 on the CPU
};

/// Builds the model of `config` (initialised from train.seed) and measures it. Throws naming
/// the key when the config cannot run here (e.g. pipeline_parallel_size > 1: bench one stage).
BenchReport run_benchmark(const config::RunConfig& config, const BenchOptions& options);

nlohmann::ordered_json to_json(const BenchReport& report, const config::RunConfig& config);

/// The report as an aligned text table (what `yuanmoe bench` prints).
std::string format_report(const BenchReport& report);

}  // namespace yuanmoe::train
