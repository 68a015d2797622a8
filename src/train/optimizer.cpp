#include "yuanmoe/train/optimizer.h"

#include "yuanmoe/core/lane_sum.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

namespace yuanmoe::train {

namespace {

/// The sum of squares of a CPU tensor's fp32 or fp64 entries, accumulated in fp64 as they are
/// read: no fp64 copy of them (at::_foreach_norm's dtype argument converts the whole tensor first,
/// 36 ms of a tiny-m32 step: docs/benchmarks.md, "Profile of the step"). Chunks of 2^16 entries,
/// each a lane_sum, then the chunks in order: the same bits whatever the thread count.
double squared_sum_cpu(const Tensor& values) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  const Tensor flat = values.contiguous().view(-1);
  const int64_t n = flat.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "squared_sum_cpu", [&] {
    const scalar_t* data = flat.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const scalar_t* chunk = data + c * kChunk;
        partial[static_cast<size_t>(c)] = lane_sum(std::min(kChunk, n - c * kChunk), [&](int64_t i) {
          const auto x = static_cast<double>(chunk[i]);
          return x * x;
        });
      }
    });
  });
  double total = 0.0;
  for (const double p : partial) total += p;
  return total;
}

}  // namespace

bool uses_weight_decay(const Tensor& parameter) { return parameter.dim() >= 2; }

Tensor squared_gradient_sum(const std::vector<Tensor>& parameters, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  std::vector<Tensor> gradients;
  for (const auto& p : parameters) {
    if (p.grad().defined()) gradients.push_back(p.grad());
  }
  if (gradients.empty()) return torch::zeros({}, torch::dtype(torch::kDouble).device(device));
  const auto cpu_floating = [](const Tensor& g) {
    return g.is_cpu() && (g.scalar_type() == torch::kFloat || g.scalar_type() == torch::kDouble);
  };
  if (std::all_of(gradients.begin(), gradients.end(), cpu_floating)) {
    RECORD_FUNCTION("yuanmoe::squared_gradient_sum", std::vector<c10::IValue>());  // in profiles
    std::vector<double> sums;
    for (const Tensor& g : gradients) sums.push_back(squared_sum_cpu(g));
    return torch::tensor(sums, torch::kDouble).sum();
  }
  // torch.nn.utils.clip_grad_norm_'s foreach norm, in fp64: one fused launch on CUDA.
  return torch::stack(at::_foreach_norm(gradients, 2, torch::kDouble)).square().sum();
}

double clip_divisor(double max_norm, double norm) {
  if (max_norm <= 0 || norm <= max_norm) return 1.0;
  return (norm + 1e-6) / max_norm;
}

}  // namespace yuanmoe::train
