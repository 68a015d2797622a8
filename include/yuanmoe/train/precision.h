// Mixed precision: `precision: bf16` runs the forward under autocast (matmuls in bf16, weights,
// optimizer state and the loss in fp32), on CUDA and on CPUs libtorch autocasts for.
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

/// The dtype of the matmuls under `precision`: bf16 (autocast over fp32 weights), fp32 or fp64.
/// The peak FLOP/s that MFU divides by is measured in it.
torch::Dtype compute_dtype(config::Precision precision);

/// RAII: autocast to bf16 on `device` while alive when precision is bf16; a no-op for fp32.
class AutocastScope {
 public:
  AutocastScope(config::Precision precision, torch::Device device);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool active_ = false;
  c10::DeviceType device_type_ = c10::DeviceType::CPU;
  bool previous_enabled_ = false;
  c10::ScalarType previous_dtype_ = torch::kBFloat16;
};

/// The training device of the process with this LOCAL_RANK: CUDA device `local_rank` when
/// libtorch has CUDA (throws naming the problem when the machine has fewer GPUs), else the CPU.
torch::Device training_device(int64_t local_rank = 0);

}  // namespace yuanmoe::train
