// The local token dispatcher: the plan groups the routed pairs by expert in batch order and
// counts them; gather's backward is index_select's without atomics; dispatch then combine with
// identity experts is the gate-weighted sum of each token's slots.
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

}  // namespace
}  // namespace yuanmoe::model
