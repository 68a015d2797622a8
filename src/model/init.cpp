#include "yuanmoe/model/init.h"

#include <cmath>

#include "yuanmoe/model/norm.h"

namespace yuanmoe::model {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

void init_weights(torch::nn::Module& model, const config::ModelConfig& config) {
  torch::NoGradGuard no_grad;
  const double output_std = config.init_std / std::sqrt(2.0 * static_cast<double>(config.num_layers));
  for (const auto& item : model.named_modules()) {
    torch::nn::Module& module = *item.value();
    if (auto* norm = dynamic_cast<RmsNormImpl*>(&module)) {
      norm->weight.fill_(1.0);
    } else if (auto* conv = dynamic_cast<torch::nn::Conv2dImpl*>(&module)) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(conv->weight.size(1) * 2));
      conv->weight.uniform_(-bound, bound);
      conv->bias.uniform_(-bound, bound);
    }
  }
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    Tensor param = item.value();
    if (name.find("layernorm.") != std::string::npos || name == "norm.weight" ||
        name.find("lf_gate.conv") != std::string::npos) {
      continue;  // written above
    }
    const bool output_projection = ends_with(name, "o_proj.weight") ||
                                   ends_with(name, "experts.w2") || ends_with(name, "mlp.w2.weight");
    param.normal_(0.0, output_projection ? output_std : config.init_std);
  }
}

}  // namespace yuanmoe::model
