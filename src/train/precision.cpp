#include "yuanmoe/train/precision.h"

#include <ATen/autocast_mode.h>

#include <stdexcept>
#include <string>

namespace yuanmoe::train {

torch::Dtype compute_dtype(config::Precision precision) {
  switch (precision) {
    case config::Precision::kBf16: return torch::kBFloat16;
    case config::Precision::kFp64: return torch::kDouble;
    case config::Precision::kFp32: break;
  }
  return torch::kFloat;
}

AutocastScope::AutocastScope(config::Precision precision, torch::Device device)
    : active_(compute_dtype(precision) == torch::kBFloat16), device_type_(device.type()) {
  if (!active_) return;
  previous_enabled_ = at::autocast::is_autocast_enabled(device_type_);
  previous_dtype_ = at::autocast::get_autocast_dtype(device_type_);
  at::autocast::set_autocast_dtype(device_type_, compute_dtype(precision));
  at::autocast::set_autocast_enabled(device_type_, true);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  // Casted weights are cached while autocast is nested; drop them when the outermost scope ends.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, previous_enabled_);
  at::autocast::set_autocast_dtype(device_type_, previous_dtype_);
}

torch::Device training_device(int64_t local_rank) {
  if (!torch::cuda::is_available()) return torch::Device(torch::kCPU);
  const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
  if (local_rank < 0 || local_rank >= gpus) {
    throw std::runtime_error("LOCAL_RANK " + std::to_string(local_rank) + " but this machine has " +
                             std::to_string(gpus) + " CUDA device(s): start one process per GPU, or hide the "
                             "GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU");
  }
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
}

}  // namespace yuanmoe::train
