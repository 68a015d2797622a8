#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {

bool uses_weight_decay(const Tensor& parameter) { return parameter.dim() >= 2; }

std::unique_ptr<torch::optim::AdamW> make_adamw(std::vector<Tensor> decayed, std::vector<Tensor> not_decayed,
                                                const config::TrainConfig& train) {
  const auto options = [&](double weight_decay) {
    return torch::optim::AdamWOptions(train.lr)
        .betas({train.adam_beta1, train.adam_beta2})
        .eps(train.adam_eps)
        .weight_decay(weight_decay);
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::move(decayed), std::make_unique<torch::optim::AdamWOptions>(options(train.weight_decay)));
  groups.emplace_back(std::move(not_decayed), std::make_unique<torch::optim::AdamWOptions>(options(0.0)));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), options(train.weight_decay));
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

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
