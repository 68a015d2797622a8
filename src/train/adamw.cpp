#include "yuanmoe/train/adamw.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adamw.h>

#include <algorithm>

namespace yuanmoe::train {

AdamW::AdamW(std::vector<Tensor> parameters, std::vector<double> weight_decays, const config::TrainConfig& train)
    : parameters_(std::move(parameters)),
      weight_decays_(std::move(weight_decays)),
      states_(parameters_.size()),
      lr_(train.lr),
      beta1_(train.adam_beta1),
      beta2_(train.adam_beta2),
      eps_(train.adam_eps) {
  TORCH_CHECK(parameters_.size() == weight_decays_.size(), "AdamW: one weight decay per parameter");
  for (const Tensor& p : parameters_) {
    TORCH_CHECK(p.is_cpu() || p.is_cuda(), "AdamW: the fused kernel runs on CPU and CUDA, not ", p.device());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "AdamW: a parameter of dtype ", p.scalar_type());
  }
}

void AdamW::step(double gradient_divisor) {
  torch::NoGradGuard no_grad;
  // One kernel launch per (device, dtype, weight decay): the lists the kernel takes.
  struct Launch {
    torch::Device device;
    torch::Dtype dtype;
    double weight_decay;
    std::vector<Tensor> parameters, gradients, exp_avgs, exp_avg_sqs, steps;
  };
  std::vector<Launch> launches;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const Tensor& p = parameters_[i];
    const Tensor& grad = p.grad();
    if (!grad.defined()) continue;
    if (!states_[i]) {
      states_[i] = State{torch::zeros_like(p), torch::zeros_like(p), torch::zeros({}, p.options().dtype(torch::kFloat))};
    }
    const torch::Dtype dtype = p.scalar_type();
    auto launch = std::find_if(launches.begin(), launches.end(), [&](const Launch& l) {
      return l.device == p.device() && l.dtype == dtype && l.weight_decay == weight_decays_[i];
    });
    if (launch == launches.end()) {
      launch = launches.insert(launches.end(), Launch{p.device(), dtype, weight_decays_[i], {}, {}, {}, {}, {}});
    }
    launch->parameters.push_back(p);
    launch->gradients.push_back(grad);
    launch->exp_avgs.push_back(states_[i]->exp_avg);
    launch->exp_avg_sqs.push_back(states_[i]->exp_avg_sq);
    launch->steps.push_back(states_[i]->step);
  }
  for (Launch& l : launches) {
    at::_foreach_add_(l.steps, 1.0);  // the kernel reads t, incremented first as torch.optim does
    std::optional<Tensor> divisor;  // fp32 on the parameters' device, as the kernel reads it
    if (gradient_divisor != 1.0) {
      divisor = torch::full({}, gradient_divisor, torch::dtype(torch::kFloat).device(l.device));
    }
    at::_fused_adamw_(l.parameters, l.gradients, l.exp_avgs, l.exp_avg_sqs, /*max_exp_avg_sqs=*/{}, l.steps, lr_,
                      beta1_, beta2_, l.weight_decay, eps_, /*amsgrad=*/false, /*maximize=*/false, divisor);
  }
}

void AdamW::set_state(size_t i, int64_t step, const Tensor& exp_avg, const Tensor& exp_avg_sq) {
  const Tensor& p = parameters_.at(i);
  const auto like_parameter = [&](const Tensor& t) {  // never aliasing the source
    return t.reshape(p.sizes()).to(p.options(), /*non_blocking=*/false, /*copy=*/true);
  };
  // fp32 counts every step exactly up to 2^24, as torch.optim's fused path keeps it.
  states_[i] = State{like_parameter(exp_avg), like_parameter(exp_avg_sq),
                     torch::full({}, static_cast<double>(step), p.options().dtype(torch::kFloat))};
}

void AdamW::clear_state() {
  for (auto& state : states_) state.reset();
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& state : states_) {
    if (state) bytes += state->exp_avg.nbytes() + state->exp_avg_sq.nbytes();
  }
  return bytes;
}

}  // namespace yuanmoe::train
