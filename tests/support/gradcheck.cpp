#include "support/gradcheck.h"

#include <gtest/gtest.h>

#include <cmath>

namespace yuanmoe::testing {

void expect_gradients_match(const std::function<torch::Tensor()>& loss,
                            const std::vector<NamedTensor>& inputs,
                            int entries_per_input,
                            double eps,
                            double tolerance) {
  std::vector<torch::Tensor> tensors;
  for (const auto& input : inputs) {
    ASSERT_EQ(input.tensor.scalar_type(), torch::kDouble) << input.name;
    ASSERT_TRUE(input.tensor.requires_grad()) << input.name;
    tensors.push_back(input.tensor);
  }
  const auto analytic = torch::autograd::grad({loss()}, tensors, /*grad_outputs=*/{},
                                              /*retain_graph=*/false, /*create_graph=*/false,
                                              /*allow_unused=*/true);
  torch::NoGradGuard no_grad;
  auto generator = at::detail::createCPUGenerator(7);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& input = inputs[i];
    ASSERT_TRUE(analytic[i].defined()) << input.name << " received no gradient";
    torch::Tensor flat = input.tensor.view(-1);
    const int64_t count = std::min<int64_t>(entries_per_input, flat.numel());
    const torch::Tensor picks = torch::randperm(flat.numel(), generator).narrow(0, 0, count);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t index = picks[j].item<int64_t>();
      const double original = flat[index].item<double>();
      flat[index].fill_(original + eps);
      const double plus = loss().item<double>();
      flat[index].fill_(original - eps);
      const double minus = loss().item<double>();
      flat[index].fill_(original);
      const double numeric = (plus - minus) / (2 * eps);
      const double exact = analytic[i].view(-1)[index].item<double>();
      EXPECT_NEAR(exact, numeric, tolerance * (1.0 + std::abs(numeric)))
          << input.name << "[" << index << "]";
    }
  }
}

}  // namespace yuanmoe::testing
