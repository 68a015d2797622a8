#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {

bool uses_weight_decay(const Tensor& parameter) { return parameter.dim() >= 2; }

Tensor squared_gradient_sum(const std::vector<Tensor>& parameters, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  std::vector<Tensor> squares;
  for (const auto& p : parameters) {
    if (p.grad().defined()) squares.push_back(p.grad().to(torch::kDouble).pow(2).sum());
  }
  return squares.empty() ? torch::zeros({}, torch::dtype(torch::kDouble).device(device))
                         : torch::stack(squares).sum();
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
