#include "yuanmoe/train/mfu.h"

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "yuanmoe/model/param_count.h"

namespace yuanmoe::train {

double training_flops_per_token(const config::RunConfig& config) {
  return 3.0 * static_cast<double>(
                   model::model_size(config.model, config.moe, config.train.seq_length).forward_flops_per_token);
}

int64_t matmul_rate_size(const torch::Device& device) { return device.is_cuda() ? 8192 : 2048; }

MatmulRate measure_matmul_rate(torch::Device device, torch::Dtype dtype, int runs) {
  const int64_t n = matmul_rate_size(device);
  torch::NoGradGuard no_grad;
  // Random operands (a constant or zero matrix runs faster than real data on some GPUs) from a
  // generator of our own: the global one, which seeds the model, stays untouched.
  at::Generator generator = at::globalContext().defaultGenerator(device).clone();
  generator.set_current_seed(20240601);
  const auto options = torch::dtype(torch::kFloat).device(device);
  const Tensor a = torch::randn({n, n}, generator, options).to(dtype);
  const Tensor b = torch::randn({n, n}, generator, options).to(dtype);
  Tensor c = torch::matmul(a, b);  // warm-up: thread pools, BLAS buffers and handles, CUDA kernels
  std::vector<double> seconds;
  if (device.is_cuda()) {
    // Device events around each product: no host clock, no host synchronisation in between.
    const c10::impl::VirtualGuardImpl guard(device.type());
    const c10::Stream stream = guard.getStream(device);
    std::vector<std::pair<c10::Event, c10::Event>> events;
    for (int run = 0; run < std::max(runs, 1); ++run) {
      events.emplace_back(c10::Event(device.type(), c10::EventFlag::BACKEND_DEFAULT),
                          c10::Event(device.type(), c10::EventFlag::BACKEND_DEFAULT));
      events.back().first.record(stream);
      c = torch::matmul(a, b);
      events.back().second.record(stream);
    }
    for (auto& [start, end] : events) {
      end.synchronize();
      seconds.push_back(start.elapsedTime(end) / 1e3);  // milliseconds
    }
  } else {
    for (int run = 0; run < std::max(runs, 1); ++run) {
      const auto start = std::chrono::steady_clock::now();
      c = torch::matmul(a, b);
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  std::vector<double> rates;
  for (double s : seconds) rates.push_back(2.0 * static_cast<double>(n * n * n) / s);
  std::sort(rates.begin(), rates.end());
  return {rates[rates.size() / 2], rates.back(), n};
}

double measure_peak_flops(torch::Device device, torch::Dtype dtype) {
  return measure_matmul_rate(device, dtype).median;
}

}  // namespace yuanmoe::train
