// The fused AdamW (train/adamw.h) against LibTorch's torch::optim::AdamW, an independent
// formulation of the same update: 20 steps with a learning rate that changes every step, two
// weight decays, parameters that are views of one flat tensor (as the sharded optimizer's
// pieces are) and a parameter without a gradient on some steps; then a state handed over from
// LibTorch's optimizer mid-run; and a gradient divisor (clipping) equal to dividing first.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include "yuanmoe/train/adamw.h"

namespace yuanmoe::train {
namespace {

constexpr int kSteps = 20;

config::TrainConfig settings() {
  config::TrainConfig train;
  train.lr = 3e-3;
  train.adam_beta1 = 0.9;
  train.adam_beta2 = 0.95;
  train.adam_eps = 1e-8;
  return train;
}

double lr_at(int step) { return 3e-3 * (1.0 + 0.1 * step) / (1.0 + 0.05 * step * step); }

/// LibTorch's AdamW over the same two groups.
std::unique_ptr<torch::optim::AdamW> libtorch_adamw(const std::vector<Tensor>& decayed,
                                                    const std::vector<Tensor>& not_decayed, double weight_decay) {
  const config::TrainConfig train = settings();
  const auto options = [&](double wd) {
    return torch::optim::AdamWOptions(train.lr).betas({train.adam_beta1, train.adam_beta2}).eps(train.adam_eps).weight_decay(wd);
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decayed, std::make_unique<torch::optim::AdamWOptions>(options(weight_decay)));
  groups.emplace_back(not_decayed, std::make_unique<torch::optim::AdamWOptions>(options(0.0)));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), options(weight_decay));
}

/// Two copies of the same parameters: [0] for the fused AdamW, [1] for LibTorch's. Index 0 and 1
/// are views of one flat tensor, 2 a matrix, 3 a vector (not decayed).
struct Parameters {
  Tensor flat[2];
  std::vector<Tensor> tensors[2];
};

Parameters make_parameters(torch::Dtype dtype) {
  Parameters out;
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(7);
  const Tensor flat = torch::randn({300}, generator, torch::dtype(dtype));
  const Tensor matrix = torch::randn({16, 24}, generator, torch::dtype(dtype));
  const Tensor vector = torch::randn({24}, generator, torch::dtype(dtype));
  for (int copy = 0; copy < 2; ++copy) {
    out.flat[copy] = flat.clone();
    out.tensors[copy] = {out.flat[copy].narrow(0, 0, 120).view({10, 12}), out.flat[copy].narrow(0, 120, 180),
                         matrix.clone(), vector.clone()};
  }
  return out;
}

void set_gradients(std::vector<Tensor>& parameters, int step) {
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(100 + step);
  for (size_t i = 0; i < parameters.size(); ++i) {
    // The matrix has no gradient on every third step: no update, no state change.
    if (i == 2 && step % 3 == 1) {
      parameters[i].mutable_grad() = Tensor();
      continue;
    }
    parameters[i].mutable_grad() = torch::randn(parameters[i].sizes(), generator, parameters[i].options());
  }
}

double max_relative_difference(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const Tensor diff = (a[i] - b[i]).abs().max().to(torch::kDouble);
    worst = std::max(worst, diff.item<double>() / b[i].abs().max().item<double>());
  }
  return worst;
}

/// `tolerance`: largest difference relative to each tensor's largest entry after 20 steps.
void expect_libtorch_update(torch::Dtype dtype, double tolerance) {
  Parameters p = make_parameters(dtype);
  const double weight_decay = 0.1;
  AdamW fused(p.tensors[0], {weight_decay, weight_decay, weight_decay, 0.0}, settings());
  const auto reference = libtorch_adamw({p.tensors[1][0], p.tensors[1][1], p.tensors[1][2]}, {p.tensors[1][3]}, weight_decay);
  for (int step = 0; step < kSteps; ++step) {
    for (int copy = 0; copy < 2; ++copy) set_gradients(p.tensors[copy], step);
    fused.set_learning_rate(lr_at(step));
    for (auto& group : reference->param_groups()) group.options().set_lr(lr_at(step));
    fused.step();
    reference->step();
  }
  EXPECT_LE(max_relative_difference(p.tensors[0], p.tensors[1]), tolerance);
  // The views wrote through to their flat tensor.
  EXPECT_TRUE(torch::equal(p.flat[0].narrow(0, 0, 120), p.tensors[0][0].reshape(-1)));
  // The moments and the step counts (the matrix skipped 7 of the 20 steps).
  for (size_t i = 0; i < p.tensors[0].size(); ++i) {
    const auto* mine = fused.state(i);
    ASSERT_NE(mine, nullptr);
    const auto& theirs =
        static_cast<const torch::optim::AdamWParamState&>(*reference->state().at(p.tensors[1][i].unsafeGetTensorImpl()));
    EXPECT_EQ(static_cast<int64_t>(mine->step.item<float>()), theirs.step()) << i;
    EXPECT_LE(max_relative_difference({mine->exp_avg}, {theirs.exp_avg()}), tolerance) << i;
    EXPECT_LE(max_relative_difference({mine->exp_avg_sq}, {theirs.exp_avg_sq()}), tolerance) << i;
  }
  EXPECT_EQ(static_cast<int64_t>(fused.state(2)->step.item<float>()), kSteps - 7);
  EXPECT_EQ(fused.state_bytes(), 2 * (300 + 16 * 24 + 24) * p.flat[0].element_size());
}

TEST(FusedAdamWTest, EqualsLibTorchAdamWToFp32RoundingOver20Steps) {
  expect_libtorch_update(torch::kFloat, 2e-6);
}

TEST(FusedAdamWTest, EqualsLibTorchAdamWInFp64) { expect_libtorch_update(torch::kDouble, 1e-12); }

// LibTorch's state after 10 steps (what a checkpoint of the replaced optimizer holds) loaded
// into the fused one: the next 10 steps agree as closely as 20 steps from the start.
TEST(FusedAdamWTest, ContinuesFromLibTorchState) {
  Parameters p = make_parameters(torch::kDouble);
  const auto reference = libtorch_adamw({p.tensors[1][0], p.tensors[1][1], p.tensors[1][2]}, {p.tensors[1][3]}, 0.1);
  for (int step = 0; step < 10; ++step) {
    set_gradients(p.tensors[1], step);
    reference->step();
  }
  for (size_t i = 0; i < 4; ++i) p.tensors[0][i].detach().copy_(p.tensors[1][i].detach());
  AdamW fused(p.tensors[0], {0.1, 0.1, 0.1, 0.0}, settings());
  for (size_t i = 0; i < 4; ++i) {
    const auto& s =
        static_cast<const torch::optim::AdamWParamState&>(*reference->state().at(p.tensors[1][i].unsafeGetTensorImpl()));
    fused.set_state(i, s.step(), s.exp_avg(), s.exp_avg_sq());
    EXPECT_NE(fused.state(i)->exp_avg.data_ptr(), s.exp_avg().data_ptr()) << "the state is a copy";
  }
  for (int step = 10; step < kSteps; ++step) {
    for (int copy = 0; copy < 2; ++copy) set_gradients(p.tensors[copy], step);
    fused.step();
    reference->step();
  }
  EXPECT_LE(max_relative_difference(p.tensors[0], p.tensors[1]), 1e-12);
  fused.clear_state();
  EXPECT_EQ(fused.state(0), nullptr);
  EXPECT_EQ(fused.state_bytes(), 0);
}

// step(divisor) divides each gradient inside the kernel: the same bits as dividing the gradients
// by the fp32 divisor first, in parameters, moments and the gradients it leaves behind.
TEST(FusedAdamWTest, GradientDivisorEqualsDividingTheGradientsFirst) {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    Parameters p = make_parameters(dtype);
    AdamW inside(p.tensors[0], {0.1, 0.1, 0.1, 0.0}, settings());
    AdamW first(p.tensors[1], {0.1, 0.1, 0.1, 0.0}, settings());
    for (int step = 0; step < 5; ++step) {
      const double divisor = 1.0 + 0.7 * step;  // 1: no division at all
      for (int copy = 0; copy < 2; ++copy) set_gradients(p.tensors[copy], step);
      const Tensor divisor_fp32 = torch::full({}, divisor, torch::kFloat);
      for (Tensor& t : p.tensors[1]) {
        if (t.grad().defined()) t.mutable_grad() = t.grad() / divisor_fp32;
      }
      inside.step(divisor);
      first.step();
      for (size_t i = 0; i < 4; ++i) {
        EXPECT_TRUE(torch::equal(p.tensors[0][i], p.tensors[1][i])) << dtype << " step " << step << " " << i;
        if (p.tensors[1][i].grad().defined()) EXPECT_TRUE(torch::equal(p.tensors[0][i].grad(), p.tensors[1][i].grad()));
        EXPECT_TRUE(torch::equal(inside.state(i)->exp_avg_sq, first.state(i)->exp_avg_sq));
      }
    }
  }
}

}  // namespace
}  // namespace yuanmoe::train
