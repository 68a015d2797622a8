// Small configs that keep Yuan's ratios (the parity config of tests/reference): D 64, 4 heads, Dh 32
// (P = 2D), rotary 16 (= Dh/2), 8 experts top-2, F 96, 2 layers.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "yuanmoe/config/config.h"
#include "yuanmoe/model/moe.h"

namespace yuanmoe::testing {

inline config::ModelConfig small_model_config() {
  config::ModelConfig m;
  m.num_layers = 2;
  m.hidden_size = 64;
  m.num_attention_heads = 4;
  m.head_dim = 32;
  m.rotary_dim = 16;
  m.rope_base = 10000;
  m.vocab_size = 97;
  m.max_seq_length = 64;
  return m;
}

inline config::MoeConfig small_moe_config(config::RouterKind router = config::RouterKind::kAttention) {
  config::MoeConfig m;
  m.num_experts = 8;
  m.top_k = 2;
  m.ffn_hidden_size = 96;
  m.router = router;
  return m;
}

inline const std::vector<config::RouterKind>& all_router_kinds() {
  static const std::vector<config::RouterKind> kinds{
      config::RouterKind::kAttention, config::RouterKind::kLinear, config::RouterKind::kRelu,
      config::RouterKind::kDense};
  return kinds;
}

/// Every test starts from the same seed (LibTorch's SeedingFixture).
class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

template <class Param>
class SeededTestWithParam : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

/// An MoE block with weights ~ N(0, 0.3): large enough that the routing is uneven.
inline model::Moe random_moe(const config::MoeConfig& config, int64_t hidden) {
  model::Moe moe(config, hidden);
  torch::NoGradGuard no_grad;
  for (auto& p : moe->parameters()) p.normal_(0.0, 0.3);
  return moe;
}

/// max |a - b|, for readable failure messages.
inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace yuanmoe::testing
