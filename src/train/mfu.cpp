#include "yuanmoe/train/mfu.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "yuanmoe/model/param_count.h"

namespace yuanmoe::train {

double training_flops_per_token(const config::RunConfig& config) {
  return 3.0 * static_cast<double>(
                   model::model_size(config.model, config.moe, config.train.seq_length).forward_flops_per_token);
}

MatmulRate measure_matmul_rate(torch::Device device, torch::Dtype dtype, int runs) {
  constexpr int64_t n = 2048;
  torch::NoGradGuard no_grad;
  const auto options = torch::dtype(dtype).device(device);
  // Constant inputs: timing does not depend on values, and the global RNG (which seeds the
  // model) stays untouched.
  const Tensor a = torch::full({n, n}, 0.5, options), b = torch::full({n, n}, 0.25, options);
  Tensor c = torch::matmul(a, b);  // warm-up: thread pools, BLAS buffers, CUDA kernels
  if (device.is_cuda()) c.sum().item<double>();
  std::vector<double> rates;
  for (int run = 0; run < std::max(runs, 1); ++run) {
    const auto start = std::chrono::steady_clock::now();
    c = torch::matmul(a, b);
    if (device.is_cuda()) c.sum().item<double>();  // wait for the kernel
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rates.push_back(2.0 * n * n * n / seconds);
  }
  std::sort(rates.begin(), rates.end());
  return {rates[rates.size() / 2], rates.back()};
}

double measure_peak_flops(torch::Device device, torch::Dtype dtype) { return measure_matmul_rate(device, dtype).median; }

}  // namespace yuanmoe::train
