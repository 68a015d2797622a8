// RMSNorm (yuan2-m32.md §2): y = w * x / sqrt(mean(x^2) + eps), statistics in fp32.
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// x_BSD -> y_BSD, same dtype as x; one final rounding (Megatron/apex convention, §12.5).
class RmsNormImpl : public torch::nn::Module {
 public:
  RmsNormImpl(int64_t dim, double eps);
  Tensor forward(const Tensor& x);

  Tensor weight;  // [D], init 1
  const double eps;
};
TORCH_MODULE(RmsNorm);

}  // namespace yuanmoe::model
