// The MoE block against a naive loop over tokens, for every router; capacity dropping; load
// statistics; the SwiGLU expert math against its formula; the grouped experts' hand-written
// backward against autograd through per-expert swiglu() in double, on one and on two threads;
// the at::_grouped_mm path against the loop.
#include <ATen/Parallel.h>

#include "support/fixtures.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/moe.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using MoeTest = testing::SeededTest;

Moe make_moe(const config::MoeConfig& config, int64_t hidden) {
  Moe moe(config, hidden);
  torch::NoGradGuard no_grad;
  for (auto& p : moe->parameters()) p.normal_(0.0, 0.3);
  return moe;
}

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
  auto moe = make_moe(testing::small_moe_config(GetParam()), 16);
  const auto x = torch::randn({3, 7, 16});
  const MoeOutput out = moe(x);
  ASSERT_EQ(out.out.sizes(), x.sizes());
  EXPECT_LT(max_abs_diff(out.out.view({21, 16}), moe_reference(*moe, x.view({21, 16}))), 1e-4);
}

TEST_P(MoeDispatchTest, IsBitwiseDeterministic) {
  auto moe = make_moe(testing::small_moe_config(GetParam()), 16);
  const auto x = torch::randn({40, 16});
  EXPECT_TRUE(torch::equal(moe(x).out, moe(x).out));
}

INSTANTIATE_TEST_SUITE_P(AllRouters, MoeDispatchTest, ::testing::ValuesIn(testing::all_router_kinds()),
                         [](const auto& info) { return config::to_string(info.param); });

TEST_F(MoeTest, CapacityFactorDropsOverflowInBatchOrder) {
  auto config = testing::small_moe_config(RouterKind::kLinear);
  config.capacity_factor = 0.5;  // C = ceil(0.5 * 32 * 2 / 8) = 4 pairs per expert
  auto moe = make_moe(config, 16);
  const auto x = torch::randn({32, 16});
  const auto out = moe(x).out;
  EXPECT_LT(max_abs_diff(out, moe_reference(*moe, x, /*capacity=*/4)), 1e-4);
  // Something was dropped: the dropless result differs.
  EXPECT_GT(max_abs_diff(out, moe_reference(*moe, x)), 1e-3);
}

TEST_F(MoeTest, ForwardReportsRoutedPairsPerExpert) {
  auto moe = make_moe(testing::small_moe_config(RouterKind::kAttention), 16);
  const auto x = torch::randn({10, 16});
  const Tensor pairs_E = moe(x).routed_pairs_E;
  ASSERT_EQ(pairs_E.sizes(), torch::IntArrayRef({8}));
  EXPECT_EQ(pairs_E.sum().item<int64_t>(), 10 * 2);  // top-2
  // The same counts as the routing itself.
  const Routing routing = moe->gate->forward(x);
  EXPECT_TRUE(torch::equal(pairs_E, torch::bincount(routing.expert_ids_TK.reshape(-1), {}, 8)));
}

TEST_F(MoeTest, DenseRouterRunsEveryExpertOnEveryToken) {
  auto moe = make_moe(testing::small_moe_config(RouterKind::kDense), 16);
  const Tensor pairs_E = moe(torch::randn({5, 16})).routed_pairs_E;
  EXPECT_TRUE(torch::equal(pairs_E, torch::full({8}, 5, torch::kLong)));
}

TEST_F(MoeTest, SwigluUsesTheFirstHalfOfW1AsGate) {
  const auto x = torch::randn({3, 4});
  const auto w1 = torch::randn({10, 4}), w2 = torch::randn({4, 5});
  const auto gate = torch::matmul(x, w1.narrow(0, 0, 5).t()), up = torch::matmul(x, w1.narrow(0, 5, 5).t());
  const auto expected = torch::matmul(gate * torch::sigmoid(gate) * up, w2.t());
  EXPECT_LT(max_abs_diff(swiglu(x, w1, w2), expected), 1e-5);
}

// Uneven groups, empty experts at both ends and in the middle: the thread partition and the
// zero-filled gradients of idle experts are both exercised.
class GroupedExpertsTest : public testing::SeededTestWithParam<int> {};

TEST_P(GroupedExpertsTest, ValuesAndGradientsEqualPerExpertSwiGLUInDouble) {
  const int threads_before = at::get_num_threads();
  at::set_num_threads(GetParam());
  GroupedExperts experts(6, 8, 5);
  experts->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    experts->w1.normal_(0.0, 0.5);
    experts->w2.normal_(0.0, 0.5);
  }
  const std::vector<int64_t> rows{0, 7, 1, 0, 12, 0};
  const auto xs = torch::randn({20, 8}, torch::dtype(torch::kDouble).requires_grad(true));
  const auto d_ys = torch::randn({20, 8}, torch::kDouble);

  const auto actual = experts->forward_loop(xs, rows);
  const auto actual_grads = torch::autograd::grad({actual}, {xs, experts->w1, experts->w2}, {d_ys});
  std::vector<torch::Tensor> pieces;
  int64_t first = 0;
  for (int64_t e = 0; e < 6; ++e) {
    if (rows[e] > 0) pieces.push_back(swiglu(xs.narrow(0, first, rows[e]), experts->w1[e], experts->w2[e]));
    first += rows[e];
  }
  const auto expected = torch::cat(pieces);
  const auto expected_grads = torch::autograd::grad({expected}, {xs, experts->w1, experts->w2}, {d_ys});
  at::set_num_threads(threads_before);

  EXPECT_LT(max_abs_diff(actual, expected), 1e-12);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(max_abs_diff(actual_grads[i], expected_grads[i]), 1e-12) << "input " << i;
  EXPECT_TRUE(actual_grads[1][0].eq(0).all().item<bool>());  // idle expert: zero gradient
}

INSTANTIATE_TEST_SUITE_P(Threads, GroupedExpertsTest, ::testing::Values(1, 2));

// at::_grouped_mm has a CPU kernel in libtorch 2.11 (fp32 and bf16, operands whose strides are
// multiples of 16 bytes), so the grouped_mm path is checked here against the loop, values and
// gradients, for every router and with capacity dropping; its plan holds no host row counts.
class GroupedMmTest : public testing::SeededTestWithParam<RouterKind> {};

TEST_P(GroupedMmTest, ExpertsThroughGroupedMmEqualTheLoop) {
  for (const double capacity_factor : {0.0, 1.0}) {
    if (capacity_factor > 0 && (GetParam() == RouterKind::kRelu || GetParam() == RouterKind::kDense)) continue;
    config::MoeConfig config = testing::small_moe_config(GetParam());
    config.capacity_factor = capacity_factor;
    config.expert_gemm = config::ExpertGemm::kLoop;
    Moe loop = make_moe(config, 16);
    config.expert_gemm = config::ExpertGemm::kGroupedMm;
    Moe grouped(config, 16);
    {
      torch::NoGradGuard no_grad;
      for (size_t p = 0; p < loop->parameters().size(); ++p) grouped->parameters()[p].copy_(loop->parameters()[p]);
    }
    const Tensor x = torch::randn({24, 16}, torch::requires_grad());
    const Tensor d_out = torch::randn({24, 16});
    const auto run = [&](Moe& moe) {
      const Tensor out = moe(x).out;
      std::vector<Tensor> inputs{x, moe->experts->w1, moe->experts->w2};
      std::vector<Tensor> grads = torch::autograd::grad({out}, inputs, {d_out});
      grads.insert(grads.begin(), out);
      return grads;
    };
    const std::vector<Tensor> a = run(loop), b = run(grouped);
    // fp32 GEMMs that sum in another order: equal to a few ulps of the largest entry (the ReLU
    // router's weight gradients reach ~130, where one ulp is 1.5e-5; CPUs differ in the order).
    for (size_t i = 0; i < a.size(); ++i) {
      const double scale = std::max(1.0, a[i].abs().max().item<double>());
      EXPECT_LT(max_abs_diff(a[i], b[i]), 1e-6 * scale) << i << " cf " << capacity_factor << " scale " << scale;
    }
    EXPECT_TRUE(grouped->experts->uses_grouped_mm(x));
    EXPECT_TRUE(plan_dispatch(grouped->gate->forward(x), 24, grouped->config, /*host_counts=*/false).rows_per_expert.empty());
  }
}

INSTANTIATE_TEST_SUITE_P(AllRouters, GroupedMmTest, ::testing::ValuesIn(testing::all_router_kinds()));

TEST_F(MoeTest, AutoPicksGroupedMmOnlyOnCudaInBf16) {
  const Moe moe(testing::small_moe_config(), 16);  // expert_gemm = auto
  EXPECT_FALSE(moe->experts->uses_grouped_mm(torch::randn({4, 16})));
  EXPECT_FALSE(moe->experts->uses_grouped_mm(torch::randn({4, 16}).to(torch::kBFloat16)));  // on the CPU: the loop
}

// gather_pairs()'s backward writes each pair's gradient to its own (token, slot) row and sums the slots
// (no index_add over duplicate token ids, whose float atomics on CUDA sum in a varying order); it
// equals index_select's autograd backward.
TEST_F(MoeTest, GatherBackwardEqualsIndexSelectWithoutAtomics) {
  const Moe moe = make_moe(testing::small_moe_config(RouterKind::kDense), 16);  // 8 slots per token
  const Tensor x = torch::randn({10, 16}, torch::dtype(torch::kDouble).requires_grad(true));
  const DispatchPlan plan = plan_dispatch(moe->gate->forward(x.to(torch::kFloat)), 10, moe->config, /*host_counts=*/true);
  const Tensor d_xs = torch::randn({plan.pair_ids_N.size(0), 16}, torch::kDouble);
  const Tensor ours = torch::autograd::grad({gather_pairs(x, plan)}, {x}, {d_xs})[0];
  const Tensor token_ids = torch::div(plan.pair_ids_N, plan.slots, "floor");
  const Tensor reference = torch::autograd::grad({x.index_select(0, token_ids)}, {x}, {d_xs})[0];
  EXPECT_LT(max_abs_diff(ours, reference), 1e-12);
}

}  // namespace
}  // namespace yuanmoe::model
