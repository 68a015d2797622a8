// Finite-difference gradient check in double precision (the C++ counterpart of
// torch.autograd.gradcheck): central differences on sampled entries vs autograd.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace yuanmoe::testing {

struct NamedTensor {
  std::string name;
  torch::Tensor tensor;  // double, requires_grad, contiguous
};

/// Checks d loss / d input for up to `entries_per_input` entries of every input (chosen with a
/// fixed seed). `loss` must be a deterministic scalar function of the inputs.
void expect_gradients_match(const std::function<torch::Tensor()>& loss,
                            const std::vector<NamedTensor>& inputs,
                            int entries_per_input = 12,
                            double eps = 1e-6,
                            double tolerance = 1e-6);

}  // namespace yuanmoe::testing
