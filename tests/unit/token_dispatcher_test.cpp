// The local token dispatcher: the plan groups the routed pairs by expert in batch order and
// counts them; gather's backward is index_select's without atomics; dispatch then combine with
// identity experts is the gate-weighted sum of each token's slots; the CPU's one-pass combine and
// gather backward equal ATen's composition of the same formula.
#include "support/fixtures.h"
#include "yuanmoe/model/token_dispatcher.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using TokenDispatcherTest = testing::SeededTest;

TEST_F(TokenDispatcherTest, PlanGroupsPairsByExpertInBatchOrder) {
  const Moe moe = testing::random_moe(testing::small_moe_config(RouterKind::kLinear), 16);
  const Routing routing = moe->gate->forward(torch::randn({12, 16}));
  const DispatchPlan plan = plan_dispatch(routing, 12, moe->config, /*host_counts=*/true);
  const Tensor expert_of_pair = routing.expert_ids_TK.reshape(-1);  // pair p = slot p % K of token p / K
  // The expected order by a loop: expert by expert, pairs in batch order.
  std::vector<int64_t> want_ids, want_rows(8, 0);
  for (int64_t e = 0; e < 8; ++e) {
    for (int64_t p = 0; p < expert_of_pair.size(0); ++p) {
      if (expert_of_pair[p].item<int64_t>() != e) continue;
      want_ids.push_back(p);
      ++want_rows[static_cast<size_t>(e)];
    }
  }
  EXPECT_TRUE(torch::equal(plan.pair_ids_N, torch::tensor(want_ids, torch::kLong)));
  EXPECT_EQ(plan.rows_per_expert, want_rows);
  EXPECT_TRUE(torch::equal(plan.routed_pairs_E, torch::tensor(want_rows, torch::kLong)));
  EXPECT_TRUE(torch::equal(plan.expert_offsets_E.to(torch::kLong),
                           torch::tensor(want_rows, torch::kLong).cumsum(0)));
  EXPECT_TRUE(torch::equal(plan.gates_N, routing.gates_TK.reshape(-1).index_select(0, plan.pair_ids_N)));
}

TEST_F(TokenDispatcherTest, DispatchThenCombineIsTheGateWeightedSumOfTheSlots) {
  const Moe moe = testing::random_moe(testing::small_moe_config(RouterKind::kAttention), 16);
  const Tensor x = torch::randn({9, 16}, torch::kDouble);
  const Routing routing = moe->gate->forward(x.to(torch::kFloat));
  LocalTokenDispatcher dispatcher(moe->config);
  const ExpertInput rows = dispatcher.dispatch(x, routing, /*host_counts=*/true);
  const Tensor out = dispatcher.combine(rows.xs_MD);  // identity experts
  const Tensor want = x * routing.gates_TK.to(torch::kDouble).sum(1, /*keepdim=*/true);
  EXPECT_LT(max_abs_diff(out, want), 1e-12);
}

// gather_pairs()'s backward writes each pair's gradient to its own (token, slot) row and sums the slots
// (no index_add over duplicate token ids, whose float atomics on CUDA sum in a varying order); it
// equals index_select's autograd backward.
TEST_F(TokenDispatcherTest, GatherBackwardEqualsIndexSelectWithoutAtomics) {
  const Moe moe = testing::random_moe(testing::small_moe_config(RouterKind::kDense), 16);  // 8 slots per token
  const Tensor x = torch::randn({10, 16}, torch::dtype(torch::kDouble).requires_grad(true));
  const DispatchPlan plan = plan_dispatch(moe->gate->forward(x.to(torch::kFloat)), 10, moe->config, /*host_counts=*/true);
  const Tensor d_xs = torch::randn({plan.pair_ids_N.size(0), 16}, torch::kDouble);
  const Tensor ours = torch::autograd::grad({gather_pairs(x, plan)}, {x}, {d_xs})[0];
  const Tensor token_ids = torch::div(plan.pair_ids_N, plan.slots, "floor");
  const Tensor reference = torch::autograd::grad({x.index_select(0, token_ids)}, {x}, {d_xs})[0];
  EXPECT_LT(max_abs_diff(ours, reference), 1e-12);
}

/// combine_pairs() as ATen operators (the formula the GPU runs): scale, write each pair to its own
/// (token, slot) row of zeros, sum the slots.
Tensor combine_by_aten(const Tensor& ys_ND, const Tensor& gates_N, const DispatchPlan& plan) {
  const Tensor scaled_ND = ys_ND * gates_N.unsqueeze(1);
  const Tensor slot_rows = torch::zeros({plan.tokens * plan.slots, ys_ND.size(1)}, ys_ND.options());
  return torch::index_copy(slot_rows, 0, plan.pair_ids_N, scaled_ND).view({plan.tokens, plan.slots, -1}).sum(1);
}

struct CombineCase {
  const char* name;
  config::RouterKind router;
  double capacity_factor;
};

// Top-2 pairs, a capacity that drops some, ReLU's absent zero-gate pairs, and every expert per
// token (dense). With two slots a token's sum is one addition, so the one-pass combine's output,
// its input gradient and the gather's backward have ATen's bits; with eight, ATen sums the slots
// in interleaved partial sums and the slot-order sum is within rounding of it. The gates'
// gradient (a dot product in lanes, not ATen's reduction order) is within rounding too: 1e-5
// relative in fp32, 1e-12 in fp64.
TEST_F(TokenDispatcherTest, CpuCombineAndGatherBackwardEqualAtenComposition) {
  const std::vector<CombineCase> cases{{"top-2", RouterKind::kLinear, 0.0},
                                       {"top-2 with drops", RouterKind::kAttention, 0.5},
                                       {"relu", RouterKind::kRelu, 0.0},
                                       {"dense", RouterKind::kDense, 0.0}};
  const int64_t tokens = 37, hidden = 67;  // neither a multiple of a task's tokens nor of the lanes
  for (const CombineCase& c : cases) {
    for (const auto dtype : {torch::kFloat, torch::kDouble}) {
      SCOPED_TRACE(std::string(c.name) + (dtype == torch::kFloat ? " fp32" : " fp64"));
      config::MoeConfig moe_config = testing::small_moe_config(c.router);
      moe_config.capacity_factor = c.capacity_factor;
      const Moe moe = testing::random_moe(moe_config, hidden);
      const Routing routing = moe->gate->forward(torch::randn({tokens, hidden}));
      const DispatchPlan plan = plan_dispatch(routing, tokens, moe->config, /*host_counts=*/true);
      const int64_t pairs = plan.pair_ids_N.size(0);
      if (c.capacity_factor > 0) ASSERT_LT(pairs, tokens * plan.slots);
      if (c.router == RouterKind::kRelu) ASSERT_LT(pairs, tokens * plan.slots);

      const Tensor ys = torch::randn({pairs, hidden}, dtype).requires_grad_(true);
      const Tensor gates = plan.gates_N.detach().to(dtype).requires_grad_(true);
      DispatchPlan ours_plan = plan;
      ours_plan.gates_N = gates;
      const Tensor ours = combine_pairs(ys, ours_plan);
      const Tensor reference = combine_by_aten(ys, gates, plan);
      const double tolerance = dtype == torch::kFloat ? 1e-5 : 1e-12;
      // Equal bits, or (more than two slots) equal to rounding relative to the largest value.
      const auto expect_equal = [&](const Tensor& got, const Tensor& want) {
        if (plan.slots == 2) {
          EXPECT_TRUE(torch::equal(got, want));
        } else {
          EXPECT_LT(max_abs_diff(got, want), tolerance * want.abs().max().item<double>());
        }
      };
      expect_equal(ours, reference);

      const Tensor d_out = torch::randn({tokens, hidden}, dtype);
      const auto ours_grads = torch::autograd::grad({ours}, {ys, gates}, {d_out});
      const auto reference_grads = torch::autograd::grad({reference}, {ys, gates}, {d_out});
      EXPECT_TRUE(torch::equal(ours_grads[0], reference_grads[0]));  // gate x d_out, one product
      EXPECT_LT(max_abs_diff(ours_grads[1], reference_grads[1]),
                tolerance * reference_grads[1].abs().max().item<double>());

      const Tensor x = torch::randn({tokens, hidden}, dtype).requires_grad_(true);
      const Tensor d_xs = torch::randn({pairs, hidden}, dtype);
      const Tensor gather_grad = torch::autograd::grad({gather_pairs(x, plan)}, {x}, {d_xs})[0];
      const Tensor slot_rows = torch::zeros({tokens * plan.slots, hidden}, d_xs.options());
      const Tensor gather_reference =
          torch::index_copy(slot_rows, 0, plan.pair_ids_N, d_xs).view({tokens, plan.slots, hidden}).sum(1);
      expect_equal(gather_grad, gather_reference);
    }
  }
}

}  // namespace
}  // namespace yuanmoe::model
