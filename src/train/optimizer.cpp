#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {

bool uses_weight_decay(const Tensor& parameter) { return parameter.dim() >= 2; }

Tensor squared_gradient_sum(const std::vector<Tensor>& parameters, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  std::vector<Tensor> gradients;
  for (const auto& p : parameters) {
    if (p.grad().defined()) gradients.push_back(p.grad());
  }
  if (gradients.empty()) return torch::zeros({}, torch::dtype(torch::kDouble).device(device));
  // torch.nn.utils.clip_grad_norm_'s foreach norm, in fp64. On the CPU it still converts each
  // tensor to fp64 first, but then reduces it in one pass instead of squaring and summing copies.
  return torch::stack(at::_foreach_norm(gradients, 2, torch::kDouble)).square().sum();
}

void scale_gradients_to_norm(const std::vector<Tensor>& parameters, double max_norm, double norm) {
  torch::NoGradGuard no_grad;
  if (max_norm <= 0 || norm <= max_norm) return;
  const double scale = max_norm / (norm + 1e-6);
  for (const auto& p : parameters) {
    if (p.grad().defined()) p.grad().mul_(scale);
  }
}

}  // namespace yuanmoe::train
