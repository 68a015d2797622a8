#include "yuanmoe/model/init.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

namespace yuanmoe::model {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// splitmix64 of (seed, FNV-1a of the name): a well-mixed, platform-independent stream id.
uint64_t seed_for(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (const unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  uint64_t z = seed + h + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

void init_weights(torch::nn::Module& model, const config::ModelConfig& config, uint64_t seed, InitDraw draw) {
  torch::NoGradGuard no_grad;
  const double output_std = config.init_std / std::sqrt(2.0 * static_cast<double>(config.num_layers));
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    Tensor param = item.value();
    const torch::Device device = draw == InitDraw::kCpu ? torch::Device(torch::kCPU) : param.device();
    at::Generator generator;
    if (device.is_cpu()) {
      generator = at::make_generator<at::CPUGeneratorImpl>(seed_for(seed, name));
    } else {  // a copy of the device's generator, reseeded: the global one stays untouched
      generator = at::globalContext().defaultGenerator(device).clone();
      generator.set_current_seed(seed_for(seed, name));
    }
    Tensor value = torch::empty(param.sizes(), torch::dtype(torch::kFloat).device(device));  // fp32
    if (name.find("layernorm.") != std::string::npos || name == "norm.weight") {
      value.fill_(1.0);
    } else if (name.find("lf_gate.conv") != std::string::npos) {
      // PyTorch's Conv2d default for weight and bias: U(+-1/sqrt(fan_in)), fan_in = in_channels * 2
      // (kernel 2 x 1); conv1 reads D channels, conv2 D/2 (Yuan 2.0, arXiv 2311.15786).
      const bool conv1 = name.find("lf_gate.conv1") != std::string::npos;
      const double fan_in = static_cast<double>((conv1 ? config.hidden_size : config.hidden_size / 2) * 2);
      const double bound = 1.0 / std::sqrt(fan_in);
      value.uniform_(-bound, bound, generator);
    } else {
      const bool output_projection = ends_with(name, "o_proj.weight") || ends_with(name, "experts.w2") ||
                                     ends_with(name, "mlp.w2.weight");
      value.normal_(0.0, output_projection ? output_std : config.init_std, generator);
    }
    param.copy_(value);
  }
}

}  // namespace yuanmoe::model
