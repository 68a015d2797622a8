#include "yuanmoe/train/optimizer.h"

#include <map>
#include <stdexcept>

namespace yuanmoe::train {

namespace {

// The optimizer's state map is keyed by the parameter's TensorImpl address (a void*).
void* state_key(const Tensor& parameter) { return parameter.unsafeGetTensorImpl(); }

}  // namespace

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

std::unique_ptr<torch::optim::AdamW> make_optimizer(const torch::nn::Module& model,
                                                    const config::TrainConfig& train) {
  std::vector<Tensor> decay, no_decay;
  for (const auto& item : model.named_parameters()) {
    (uses_weight_decay(item.value()) ? decay : no_decay).push_back(item.value());
  }
  return make_adamw(std::move(decay), std::move(no_decay), train);
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

checkpoint::NamedTensors optimizer_state_by_name(const torch::nn::Module& model,
                                                 torch::optim::AdamW& optimizer) {
  checkpoint::NamedTensors out;
  auto& states = optimizer.state();
  for (const auto& item : model.named_parameters()) {
    const auto it = states.find(state_key(item.value()));
    if (it == states.end()) continue;
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    out.emplace_back(item.key() + "/exp_avg", s.exp_avg());
    out.emplace_back(item.key() + "/exp_avg_sq", s.exp_avg_sq());
    out.emplace_back(item.key() + "/step", torch::tensor(s.step(), torch::kLong));
  }
  return out;
}

void load_optimizer_state_by_name(const torch::nn::Module& model,
                                  torch::optim::AdamW& optimizer,
                                  const checkpoint::NamedTensors& state,
                                  const std::string& source) {
  std::map<std::string, Tensor> by_name(state.begin(), state.end());
  auto take = [&](const std::string& name) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error(source + ": optimizer state lacks '" + name + "'");
    Tensor t = it->second;
    by_name.erase(it);
    return t;
  };
  auto& states = optimizer.state();
  states.clear();
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    if (by_name.count(name + "/step") == 0) continue;  // no state yet (see the header)
    const Tensor& p = item.value();
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(take(name + "/step").item<int64_t>());
    for (const char* field : {"exp_avg", "exp_avg_sq"}) {
      const Tensor t = take(name + "/" + field);
      if (t.sizes() != p.sizes()) {
        throw std::runtime_error(source + ": optimizer state '" + name + "/" + field + "' has shape " +
                                 c10::str(t.sizes()) + ", the parameter " + c10::str(p.sizes()));
      }
      const Tensor owned = t.to(p.options(), /*non_blocking=*/false, /*copy=*/true);  // never alias the source
      (std::string(field) == "exp_avg" ? s->exp_avg(owned) : s->exp_avg_sq(owned));
    }
    states[state_key(p)] = std::move(s);
  }
  if (!by_name.empty()) {
    throw std::runtime_error(source + ": optimizer state for unknown parameter '" +
                             by_name.begin()->first + "'");
  }
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

double squared_gradient_norm(const std::vector<Tensor>& parameters) {
  return squared_gradient_sum(parameters, torch::kCPU).item<double>();  // one read for the whole model
}

void scale_gradients_to_norm(const std::vector<Tensor>& parameters, double max_norm, double norm) {
  torch::NoGradGuard no_grad;
  if (max_norm <= 0 || norm <= max_norm) return;
  const double scale = max_norm / (norm + 1e-6);
  for (const auto& p : parameters) {
    if (p.grad().defined()) p.grad().mul_(scale);
  }
}

double clip_gradients(const std::vector<Tensor>& parameters, double max_norm) {
  const double norm = std::sqrt(squared_gradient_norm(parameters));
  scale_gradients_to_norm(parameters, max_norm, norm);
  return norm;
}

}  // namespace yuanmoe::train
