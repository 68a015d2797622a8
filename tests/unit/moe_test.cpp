// The MoE block (route -> dispatch -> experts -> combine) against a naive loop over tokens, for
// every router; capacity dropping; the routed pairs it reports per expert.
#include "support/fixtures.h"
#include "yuanmoe/model/moe.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using MoeTest = testing::SeededTest;

/// One expert on one token, written out: gate half first, silu on the gate.
torch::Tensor expert_reference(const GroupedExpertsImpl& experts, int64_t e, const torch::Tensor& x_D) {
  const int64_t F = experts.w2.size(2);
  const auto w1 = experts.w1[e].to(torch::kDouble), w2 = experts.w2[e].to(torch::kDouble);
  const auto gate = torch::mv(w1.narrow(0, 0, F), x_D), up = torch::mv(w1.narrow(0, F, F), x_D);
  return torch::mv(w2, gate / (1 + torch::exp(-gate)) * up);
}

/// out_t = sum over the token's slots with non-zero routing of gate * expert(x_t); slots beyond an
/// expert's capacity (counted in token order) contribute nothing.
torch::Tensor moe_reference(MoeImpl& moe, const torch::Tensor& x_TD, int64_t capacity = -1) {
  const Routing routing = moe.gate->forward(x_TD);
  const auto x = x_TD.to(torch::kDouble);
  auto out = torch::zeros_like(x);
  std::vector<int64_t> used(moe.config.num_experts, 0);
  for (int64_t t = 0; t < x.size(0); ++t) {
    for (int64_t s = 0; s < routing.gates_TK.size(1); ++s) {
      const double gate = routing.gates_TK[t][s].item<double>();
      const int64_t e = routing.expert_ids_TK[t][s].item<int64_t>();
      if (routing.skip_zero_gates && gate == 0) continue;
      if (capacity >= 0 && used[e]++ >= capacity) continue;
      out[t] += gate * expert_reference(*moe.experts, e, x[t]);
    }
  }
  return out;
}

class MoeDispatchTest : public testing::SeededTestWithParam<RouterKind> {};

TEST_P(MoeDispatchTest, MatchesNaiveLoopOverTokens) {
  auto moe = testing::random_moe(testing::small_moe_config(GetParam()), 16);
  const auto x = torch::randn({3, 7, 16});
  const MoeOutput out = moe(x);
  ASSERT_EQ(out.out.sizes(), x.sizes());
  EXPECT_LT(max_abs_diff(out.out.view({21, 16}), moe_reference(*moe, x.view({21, 16}))), 1e-4);
}

TEST_P(MoeDispatchTest, IsBitwiseDeterministic) {
  auto moe = testing::random_moe(testing::small_moe_config(GetParam()), 16);
  const auto x = torch::randn({40, 16});
  EXPECT_TRUE(torch::equal(moe(x).out, moe(x).out));
}

INSTANTIATE_TEST_SUITE_P(AllRouters, MoeDispatchTest, ::testing::ValuesIn(testing::all_router_kinds()),
                         [](const auto& info) { return config::to_string(info.param); });

TEST_F(MoeTest, CapacityFactorDropsOverflowInBatchOrder) {
  auto config = testing::small_moe_config(RouterKind::kLinear);
  config.capacity_factor = 0.5;  // C = ceil(0.5 * 32 * 2 / 8) = 4 pairs per expert
  auto moe = testing::random_moe(config, 16);
  const auto x = torch::randn({32, 16});
  const auto out = moe(x).out;
  EXPECT_LT(max_abs_diff(out, moe_reference(*moe, x, /*capacity=*/4)), 1e-4);
  // Something was dropped: the dropless result differs.
  EXPECT_GT(max_abs_diff(out, moe_reference(*moe, x)), 1e-3);
}

TEST_F(MoeTest, ForwardReportsRoutedPairsPerExpert) {
  auto moe = testing::random_moe(testing::small_moe_config(RouterKind::kAttention), 16);
  const auto x = torch::randn({10, 16});
  const Tensor pairs_E = moe(x).routed_pairs_E;
  ASSERT_EQ(pairs_E.sizes(), torch::IntArrayRef({8}));
  EXPECT_EQ(pairs_E.sum().item<int64_t>(), 10 * 2);  // top-2
  // The same counts as the routing itself.
  const Routing routing = moe->gate->forward(x);
  EXPECT_TRUE(torch::equal(pairs_E, torch::bincount(routing.expert_ids_TK.reshape(-1), {}, 8)));
}

TEST_F(MoeTest, DenseRouterRunsEveryExpertOnEveryToken) {
  auto moe = testing::random_moe(testing::small_moe_config(RouterKind::kDense), 16);
  const Tensor pairs_E = moe(torch::randn({5, 16})).routed_pairs_E;
  EXPECT_TRUE(torch::equal(pairs_E, torch::full({8}, 5, torch::kLong)));
}

}  // namespace
}  // namespace yuanmoe::model
