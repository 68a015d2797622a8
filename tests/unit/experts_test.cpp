// The experts room: the SwiGLU expert against its formula; the grouped experts' hand-written
// backward against autograd through per-expert swiglu() in double, on one and on two threads;
// the at::_grouped_mm kernel against the loop, through the MoE block the step runs.
#include <ATen/Parallel.h>

#include "support/fixtures.h"
#include "yuanmoe/model/experts.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/model/token_dispatcher.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using ExpertsTest = testing::SeededTest;

TEST_F(ExpertsTest, SwigluUsesTheFirstHalfOfW1AsGate) {
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


// fp32 takes small_mm_into's kernel where the CPU has AVX-512 (the double test above runs the same
// transposed layout through at::mm_out): against the same experts in double, with row counts that
// leave tails in both tile directions.
TEST_P(GroupedExpertsTest, Fp32ValuesAndGradientsFollowDouble) {
  const int threads_before = at::get_num_threads();
  at::set_num_threads(GetParam());
  GroupedExperts experts(4, 64, 48);
  {
    torch::NoGradGuard no_grad;
    experts->w1.normal_(0.0, 0.1);
    experts->w2.normal_(0.0, 0.1);
  }
  const std::vector<int64_t> rows{0, 70, 13, 1};
  const auto xs = torch::randn({84, 64}, torch::requires_grad(true));
  const auto d_ys = torch::randn({84, 64});
  const auto actual = experts->forward_loop(xs, rows);
  const auto actual_grads = torch::autograd::grad({actual}, {xs, experts->w1, experts->w2}, {d_ys});

  GroupedExperts experts64(4, 64, 48);
  {
    torch::NoGradGuard no_grad;
    experts64->to(torch::kDouble);
    experts64->w1.copy_(experts->w1);
    experts64->w2.copy_(experts->w2);
  }
  const auto xs64 = xs.detach().to(torch::kDouble).requires_grad_(true);
  const auto expected = experts64->forward_loop(xs64, rows);
  const auto expected_grads =
      torch::autograd::grad({expected}, {xs64, experts64->w1, experts64->w2}, {d_ys.to(torch::kDouble)});
  at::set_num_threads(threads_before);

  EXPECT_LT(max_abs_diff(actual.to(torch::kDouble), expected), 1e-5);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_LT(max_abs_diff(actual_grads[i].to(torch::kDouble), expected_grads[i]), 1e-4) << "input " << i;
  }
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
    Moe loop = testing::random_moe(config, 16);
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

TEST_F(ExpertsTest, AutoPicksGroupedMmOnlyOnCudaInBf16) {
  const Moe moe(testing::small_moe_config(), 16);  // expert_gemm = auto
  EXPECT_FALSE(moe->experts->uses_grouped_mm(torch::randn({4, 16})));
  EXPECT_FALSE(moe->experts->uses_grouped_mm(torch::randn({4, 16}).to(torch::kBFloat16)));  // on the CPU: the loop
}

}  // namespace
}  // namespace yuanmoe::model
