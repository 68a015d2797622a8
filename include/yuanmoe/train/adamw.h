// AdamW (Loshchilov & Hutter, arXiv 1711.05101: decoupled weight decay) as PyTorch's fused
// kernel computes it: at::_fused_adamw_ updates a whole list of tensors in one pass over each
// (CPU and CUDA, every floating dtype), where LibTorch's torch::optim::AdamW runs about nine
// elementwise kernels per parameter. Per parameter i with gradient g, at step t:
//
//   p  <- p (1 - lr wd_i)
//   m  <- b1 m + (1 - b1) g              v <- b2 v + (1 - b2) g^2
//   p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//
// which is torch.optim.AdamW(fused=True). The kernel takes one weight decay, dtype and device
// per call, so the parameters are launched in lists grouped by those three.
#pragma once

#include <optional>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::train {

class AdamW {
 public:
  /// One parameter's moments and step count.
  struct State {
    Tensor exp_avg, exp_avg_sq;  // like the parameter
    Tensor step;                 // [] fp32 on the parameter's device: the kernel reads it there
  };

  /// `parameters[i]` decays with `weight_decays[i]`; lr, betas and eps from `train`. Parameters
  /// are updated in place (views of a larger tensor are fine).
  AdamW(std::vector<Tensor> parameters, std::vector<double> weight_decays, const config::TrainConfig& train);

  void set_learning_rate(double lr) { lr_ = lr; }
  /// Updates every parameter that has a gradient; one without keeps its value and its state (a
  /// routed expert no token reached, as torch.optim.AdamW skips it). Each gradient is divided by
  /// gradient_divisor first, in place (clipping: clip_divisor() in optimizer.h), inside the kernel:
  /// its grad_scale, which GradScaler uses to unscale, and which divides in fp32 as g / s.
  void step(double gradient_divisor = 1.0);

  size_t size() const { return parameters_.size(); }
  /// Parameter i's state, nullptr before its first update.
  const State* state(size_t i) const { return states_[i] ? &*states_[i] : nullptr; }
  /// Parameter i's state from a checkpoint: `step` updates done, the moments copied onto the
  /// parameter's device.
  void set_state(size_t i, int64_t step, const Tensor& exp_avg, const Tensor& exp_avg_sq);
  void clear_state();
  /// Bytes of moments held now.
  int64_t state_bytes() const;

 private:
  std::vector<Tensor> parameters_;
  std::vector<double> weight_decays_;
  std::vector<std::optional<State>> states_;
  double lr_, beta1_, beta2_, eps_;
};

}  // namespace yuanmoe::train
