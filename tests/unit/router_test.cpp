// Routers against per-token loops and the reference formulas (docs/routers.md), gating properties for
// every router kind, and each router's once-per-step update (the ReLU coefficient, the bias).
#include "support/fixtures.h"
#include "yuanmoe/model/expert_attention.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/train/precision.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using RouterTest = testing::SeededTest;

std::shared_ptr<RouterImpl> make_initialised_router(const config::MoeConfig& moe, int64_t hidden) {
  auto router = make_router(moe, hidden);
  torch::NoGradGuard no_grad;
  for (auto& p : router->parameters()) p.normal_(0.0, 0.3);
  return router;
}

/// HF form of top-k gating: softmax over all experts, take the k largest, divide by their sum.
void expect_hf_top_k(const Routing& routing, const torch::Tensor& logits_TE, int64_t k) {
  const auto probs = torch::softmax(logits_TE.to(torch::kDouble), -1);
  for (int64_t t = 0; t < logits_TE.size(0); ++t) {
    const auto order = std::get<1>(probs[t].sort(/*dim=*/-1, /*descending=*/true));
    double selected_sum = 0;
    for (int64_t s = 0; s < k; ++s) selected_sum += probs[t][order[s]].item<double>();
    for (int64_t s = 0; s < k; ++s) {
      const int64_t expert = order[s].item<int64_t>();
      EXPECT_EQ(routing.expert_ids_TK[t][s].item<int64_t>(), expert) << "token " << t;
      EXPECT_NEAR(routing.gates_TK[t][s].item<double>(), probs[t][expert].item<double>() / selected_sum, 1e-6);
    }
  }
}

/// Yuan's attention router by per-token loops (arXiv 2405.17976), in double: logits [T, E].
torch::Tensor attention_router_logits_loop(AttentionRouterImpl& attention, const torch::Tensor& x) {
  const int64_t T = x.size(0), E = attention.config.num_experts;
  auto logits = torch::zeros({T, E}, torch::kDouble);
  for (int64_t t = 0; t < T; ++t) {
    const auto xt = x[t].to(torch::kDouble);
    const auto q = torch::mv(attention.query->weight.to(torch::kDouble), xt);
    const auto k = torch::mv(attention.key->weight.to(torch::kDouble), xt);
    const auto v = torch::mv(attention.value->weight.to(torch::kDouble), xt);
    for (int64_t i = 0; i < E; ++i) {
      // Row i: softmax_j(q_i k_j), no 1/sqrt scaling; r_i = sum_j P_ij v_j.
      double max_a = -1e300;
      for (int64_t j = 0; j < E; ++j) max_a = std::max(max_a, (q[i] * k[j]).item<double>());
      double total = 0, weighted = 0;
      for (int64_t j = 0; j < E; ++j) {
        const double p = std::exp((q[i] * k[j]).item<double>() - max_a);
        total += p;
        weighted += p * v[j].item<double>();
      }
      logits[t][i] = weighted / total;
    }
    // r is a convex combination of v.
    EXPECT_GE(logits[t].min().item<double>(), v.min().item<double>() - 1e-9);
    EXPECT_LE(logits[t].max().item<double>(), v.max().item<double>() + 1e-9);
  }
  return logits;
}

TEST_F(RouterTest, AttentionRouterMatchesPerTokenLoop) {
  const auto moe = testing::small_moe_config(RouterKind::kAttention);
  auto router = make_initialised_router(moe, 16);
  const auto x = torch::randn({5, 16});
  const auto logits = attention_router_logits_loop(dynamic_cast<AttentionRouterImpl&>(*router), x);
  const Routing routing = router->forward(x);
  EXPECT_EQ(routing.gates_TK.scalar_type(), torch::kFloat);
  expect_hf_top_k(routing, logits, moe.top_k);
}

TEST_F(RouterTest, LinearRouterMatchesSoftmaxThenRenormalise) {
  const auto moe = testing::small_moe_config(RouterKind::kLinear);
  auto router = make_initialised_router(moe, 16);
  const auto x = torch::randn({7, 16});
  const auto logits = torch::matmul(x.to(torch::kDouble),
                                    dynamic_cast<LinearRouterImpl&>(*router).weight.to(torch::kDouble).t());
  expect_hf_top_k(router->forward(x), logits, moe.top_k);
}

TEST_F(RouterTest, RoutersRunInFp32ForBf16Input) {
  for (auto kind : testing::all_router_kinds()) {
    auto router = make_initialised_router(testing::small_moe_config(kind), 16);
    const auto x = torch::randn({4, 16});
    const Routing fp32 = router->forward(x);
    const Routing bf16 = router->forward(x.to(torch::kBFloat16));
    EXPECT_EQ(bf16.gates_TK.scalar_type(), torch::kFloat) << config::to_string(kind);
    EXPECT_LT(max_abs_diff(fp32.gates_TK, bf16.gates_TK), 0.05) << config::to_string(kind);
  }
}

// The attention router (one fused [3E, D] GEMM, src/model/router.cpp) against the formula with
// three projections, in double: gates and the gradients of a loss on them, for x and the three
// weights.
TEST_F(RouterTest, AttentionRouterEqualsTheFormulaWithGradientsInFp64) {
  const auto moe = testing::small_moe_config(RouterKind::kAttention);
  auto router = make_initialised_router(moe, 16);
  router->to(torch::kDouble);
  auto& attention = dynamic_cast<AttentionRouterImpl&>(*router);
  const Tensor x = torch::randn({9, 16}, torch::kDouble).requires_grad_(true);
  const Routing routing = router->forward(x);
  const Tensor weights_TK = torch::randn(routing.gates_TK.sizes(), torch::kDouble);
  const std::vector<Tensor> inputs{x, attention.query->weight, attention.key->weight, attention.value->weight};
  const auto ours = torch::autograd::grad({(routing.gates_TK * weights_TK).sum()}, inputs);

  std::vector<Tensor> leaves;
  for (const Tensor& t : inputs) leaves.push_back(t.detach().clone().requires_grad_(true));
  const Tensor q = torch::matmul(leaves[0], leaves[1].t()), k = torch::matmul(leaves[0], leaves[2].t()),
               v = torch::matmul(leaves[0], leaves[3].t());
  const Tensor logits_TE = (torch::softmax(q.unsqueeze(2) * k.unsqueeze(1), -1) * v.unsqueeze(1)).sum(-1);
  const Tensor chosen_TK = torch::softmax(logits_TE, -1).gather(1, routing.expert_ids_TK);
  const Tensor gates_TK = chosen_TK / chosen_TK.sum(-1, /*keepdim=*/true);
  const auto theirs = torch::autograd::grad({(gates_TK * weights_TK).sum()}, leaves);
  EXPECT_LT(max_abs_diff(routing.gates_TK, gates_TK), 1e-14);
  const char* names[] = {"x", "query", "key", "value"};
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_LT(max_abs_diff(ours[i], theirs[i]), 1e-12) << names[i];
    EXPECT_GT(theirs[i].abs().max().item<double>(), 1e-3) << names[i];  // a gradient worth comparing
  }
}

/// r_i = sum_j softmax_j(q_i k_j) v_j by broadcasting, the form autograd differentiates.
Tensor expert_attention_formula(const Tensor& qkv_T3E) {
  const std::vector<Tensor> qkv = qkv_T3E.split(qkv_T3E.size(1) / 3, -1);
  return (torch::softmax(qkv[0].unsqueeze(2) * qkv[1].unsqueeze(1), -1) * qkv[2].unsqueeze(1)).sum(-1);
}

// The expert attention's CPU kernel (src/model/router.cpp) against the formula in fp64, with the
// gradient of every part of q, k and v: E = 5 leaves a tail after the kernel's 8-lane sums, 21
// tokens a part-filled block of 8, and the spread of q k (up to about 40) puts most of each
// softmax row far below its maximum.
TEST_F(RouterTest, ExpertAttentionKernelEqualsTheFormulaWithGradientsInFp64) {
  for (const int64_t experts : {5, 32}) {
    const Tensor qkv = (3.0 * torch::randn({21, 3 * experts}, torch::kDouble)).requires_grad_(true);
    const Tensor weights_TE = torch::randn({21, experts}, torch::kDouble);
    const Tensor ours = expert_attention(qkv);
    const Tensor theirs = expert_attention_formula(qkv);
    EXPECT_LT(max_abs_diff(ours, theirs), 1e-13) << "E = " << experts;
    const Tensor d_ours = torch::autograd::grad({(ours * weights_TE).sum()}, {qkv})[0];
    const Tensor d_theirs = torch::autograd::grad({(theirs * weights_TE).sum()}, {qkv})[0];
    EXPECT_LT(max_abs_diff(d_ours, d_theirs), 1e-12) << "E = " << experts;
    for (int64_t part = 0; part < 3; ++part) {  // q, k and v each get a gradient worth comparing
      EXPECT_GT(d_theirs.narrow(1, part * experts, experts).abs().max().item<double>(), 1e-2) << part;
    }
  }
}

// In fp32 the kernel works token by token, so the thread count cannot change its bits; and a
// saturated softmax (q k up to about 10^4) stays finite and agrees with the fp64 formula.
TEST_F(RouterTest, ExpertAttentionKernelInFp32IsThreadIndependentAndFinite) {
  const int threads = at::get_num_threads();
  for (const double scale : {1.0, 100.0}) {
    const Tensor qkv = (scale * torch::randn({37, 96})).requires_grad_(true);
    const Tensor weights_TE = torch::randn({37, 32});
    std::vector<Tensor> results;
    for (const int n : {1, 2}) {
      at::set_num_threads(n);
      const Tensor logits = expert_attention(qkv);
      results.push_back(logits.detach());
      results.push_back(torch::autograd::grad({(logits * weights_TE).sum()}, {qkv})[0]);
    }
    at::set_num_threads(threads);
    EXPECT_TRUE(torch::equal(results[0], results[2])) << "scale " << scale;
    EXPECT_TRUE(torch::equal(results[1], results[3])) << "scale " << scale;
    EXPECT_TRUE(torch::isfinite(results[1]).all().item<bool>()) << "scale " << scale;
    const Tensor reference = expert_attention_formula(qkv.detach().to(torch::kDouble));
    EXPECT_LT(max_abs_diff(results[0].to(torch::kDouble), reference), 1e-5 * scale) << "scale " << scale;
  }
}

// Under bf16 autocast (train.precision = bf16) the routers' GEMMs still run in fp32: the same
// bits as without autocast.
TEST_F(RouterTest, RouterScoresIgnoreAutocast) {
  for (auto kind : testing::all_router_kinds()) {
    auto router = make_initialised_router(testing::small_moe_config(kind), 16);
    const auto x = torch::randn({6, 16});
    const Routing plain = router->forward(x);
    const Routing autocast = [&] {
      train::AutocastScope scope(config::Precision::kBf16, torch::kCPU);
      return router->forward(x);
    }();
    EXPECT_TRUE(torch::equal(plain.gates_TK, autocast.gates_TK)) << config::to_string(kind);
  }
}

class RouterPropertyTest : public testing::SeededTestWithParam<RouterKind> {};

TEST_P(RouterPropertyTest, GatesHaveTheRouterShape) {
  const auto moe = testing::small_moe_config(GetParam());
  auto router = make_initialised_router(moe, 16);
  const auto x = torch::randn({64, 16});
  const Routing r = router->forward(x);
  const int64_t T = 64, E = moe.num_experts, k = moe.top_k;
  switch (GetParam()) {
    case RouterKind::kAttention:
    case RouterKind::kLinear: {
      // Exactly k distinct experts per token, gates > 0 summing to 1.
      ASSERT_EQ(r.gates_TK.sizes(), (std::vector<int64_t>{T, k}));
      EXPECT_TRUE((r.gates_TK > 0).all().item<bool>());
      EXPECT_LT(max_abs_diff(r.gates_TK.sum(-1), torch::ones({T})), 1e-6);
      EXPECT_TRUE((r.expert_ids_TK.select(1, 0) != r.expert_ids_TK.select(1, 1)).all().item<bool>());
      EXPECT_FALSE(r.skip_zero_gates);
      break;
    }
    case RouterKind::kRelu: {
      // Non-negative, unnormalised, a variable number of active experts per token.
      ASSERT_EQ(r.gates_TK.sizes(), (std::vector<int64_t>{T, E}));
      EXPECT_TRUE((r.gates_TK >= 0).all().item<bool>());
      const auto active = (r.gates_TK > 0).sum(-1);
      EXPECT_GT(active.max().item<int64_t>(), active.min().item<int64_t>());
      EXPECT_TRUE(r.skip_zero_gates);
      break;
    }
    case RouterKind::kDense: {
      // Every expert on every token, softmax gates.
      ASSERT_EQ(r.gates_TK.sizes(), (std::vector<int64_t>{T, E}));
      EXPECT_TRUE((r.gates_TK > 0).all().item<bool>());
      EXPECT_LT(max_abs_diff(r.gates_TK.sum(-1), torch::ones({T})), 1e-6);
      EXPECT_TRUE(torch::equal(r.expert_ids_TK, torch::arange(E).expand({T, E})));
      break;
    }
  }
}

TEST_P(RouterPropertyTest, AuxLossOnlyWhileTraining) {
  auto moe = testing::small_moe_config(GetParam());
  moe.aux_loss_coeff = 1e-2;
  moe.z_loss_coeff = 1e-3;
  auto router = make_initialised_router(moe, 16);
  const auto x = torch::randn({8, 16});
  router->eval();
  EXPECT_FALSE(router->forward(x).aux_loss.defined());
  router->train();
  const bool has_term = GetParam() != RouterKind::kDense;
  EXPECT_EQ(router->forward(x).aux_loss.defined(), has_term);
}

/// Sum over tokens of the entropy (nats) of each token's routing distribution, by loops over
/// the logits: softmax, or for ReMoE the ReLU gates over their sum (no active expert: 0).
double routing_entropy_sum_loop(const torch::Tensor& logits_TE, bool relu) {
  double sum = 0;
  for (int64_t t = 0; t < logits_TE.size(0); ++t) {
    std::vector<double> weights;
    for (int64_t e = 0; e < logits_TE.size(1); ++e) {
      const double l = logits_TE[t][e].item<double>();
      weights.push_back(relu ? std::max(l, 0.0) : l);
    }
    if (!relu) {
      const double max_l = *std::max_element(weights.begin(), weights.end());
      for (double& w : weights) w = std::exp(w - max_l);
    }
    double total = 0;
    for (double w : weights) total += w;
    for (double w : weights) {
      if (w > 0) sum -= (w / total) * std::log(w / total);
    }
  }
  return sum;
}

TEST_P(RouterPropertyTest, EvalModeSumsTheRoutingEntropy) {
  const RouterKind kind = GetParam();
  const auto moe = testing::small_moe_config(kind);
  auto router = make_initialised_router(moe, 16);
  const auto logits_loop = [&](const torch::Tensor& x) {
    if (kind == RouterKind::kAttention) {
      return attention_router_logits_loop(dynamic_cast<AttentionRouterImpl&>(*router), x);
    }
    const auto named = router->named_parameters();
    return torch::mm(x.to(torch::kDouble), named["weight"].to(torch::kDouble).t());  // W x
  };
  const auto x1 = torch::randn({6, 16}), x2 = torch::randn({4, 16});
  router->train();
  router->forward(x1);
  EXPECT_EQ(router->take_eval_stats().tokens, 0) << "training passes are not counted";
  router->eval();
  router->forward(x1);
  router->forward(x2);
  const RouterEvalStats stats = router->take_eval_stats();
  const bool relu = kind == RouterKind::kRelu;
  const double want = routing_entropy_sum_loop(logits_loop(x1), relu) + routing_entropy_sum_loop(logits_loop(x2), relu);
  EXPECT_EQ(stats.tokens, 10);
  EXPECT_NEAR(stats.entropy_sum, want, 1e-5 * std::max(1.0, want));
  EXPECT_GT(stats.entropy_sum, 0.0);
  EXPECT_LE(stats.entropy_sum / 10, std::log(static_cast<double>(moe.num_experts)) + 1e-9);
  const RouterEvalStats after = router->take_eval_stats();
  EXPECT_EQ(after.tokens, 0);
  EXPECT_EQ(after.entropy_sum, 0.0);
}

/// Tokens whose k-th and (k+1)-th largest weights tie, by sorting each row by hand.
std::pair<double, double> tie_counts_loop(const torch::Tensor& p_TE, int64_t k, bool positive_only) {
  double tied = 0, exactly = 0;
  for (int64_t t = 0; t < p_TE.size(0); ++t) {
    std::vector<double> row;
    for (int64_t e = 0; e < p_TE.size(1); ++e) row.push_back(p_TE[t][e].item<double>());
    std::sort(row.begin(), row.end(), std::greater<>());
    const double kth = row[static_cast<size_t>(k - 1)], next = row[static_cast<size_t>(k)];
    if (positive_only && next <= 0) continue;
    tied += kth - next <= kRoutingTieTolerance;
    exactly += kth == next;
  }
  return {tied, exactly};
}

TEST_F(RouterTest, TieCountsMatchASortPerToken) {
  // Rows with exact ties, near ties (5e-7 apart), clear gaps and ties at zero.
  const auto p_TE = torch::tensor({{0.4, 0.2, 0.2, 0.2},
                                   {0.5, 0.3, 0.2, 0.0},
                                   {0.5, 0.25, 0.2499995, 0.0000005},
                                   {1.0, 0.0, 0.0, 0.0},
                                   {0.25, 0.25, 0.25, 0.25}},
                                  torch::kFloat);
  for (const bool positive_only : {false, true}) {
    for (const int64_t k : {1, 2, 3}) {
      const auto [tied, exactly] = tie_counts_loop(p_TE, k, positive_only);
      const torch::Tensor counts = routing_tie_counts(p_TE, k, positive_only);
      EXPECT_EQ(counts[0].item<double>(), tied) << "k " << k << " positive_only " << positive_only;
      EXPECT_EQ(counts[1].item<double>(), exactly) << "k " << k << " positive_only " << positive_only;
    }
  }
  // k = 2: rows 0, 2, 4 tie within 1e-6 (row 3 too, at zero), rows 0, 3, 4 exactly.
  EXPECT_EQ(routing_tie_counts(p_TE, 2, false)[0].item<double>(), 4.0);
  EXPECT_EQ(routing_tie_counts(p_TE, 2, false)[1].item<double>(), 3.0);
  EXPECT_EQ(routing_tie_counts(p_TE, 2, true)[1].item<double>(), 2.0);
  EXPECT_EQ(routing_tie_counts(p_TE, 4, false).sum().item<double>(), 0.0) << "no (k+1)-th weight";
}

// A saturated attention router: with large q and k, each row of the per-token E x E softmax is
// one-hot at argmax_j q_i k_j, which is the largest k_j for q_i > 0 and the smallest for q_i < 0.
// Every logit r_i is then one of two values of v, and top-2 meets exact ties.
TEST_F(RouterTest, ASaturatedAttentionRouterTiesExactly) {
  auto moe = testing::small_moe_config(RouterKind::kAttention);
  auto router = make_initialised_router(moe, 16);
  auto& attention = dynamic_cast<AttentionRouterImpl&>(*router);
  {
    torch::NoGradGuard no_grad;
    attention.query->weight.mul_(100.0);
    attention.key->weight.mul_(100.0);
  }
  router->eval();
  const auto x_TD = torch::randn({64, 16});
  router->forward(x_TD);  // in eval mode: counts the statistics
  const RouterEvalStats stats = router->take_eval_stats();
  EXPECT_GT(stats.exactly_tied_tokens, 0.5 * 64) << "most tokens tie when the router saturates";
  EXPECT_GE(stats.tied_tokens, stats.exactly_tied_tokens);
}

INSTANTIATE_TEST_SUITE_P(AllRouters, RouterPropertyTest, ::testing::ValuesIn(testing::all_router_kinds()),
                         [](const auto& info) { return config::to_string(info.param); });

TEST_F(RouterTest, ReluCoefficientFollowsTheSparsityController) {
  auto moe = testing::small_moe_config(RouterKind::kRelu);
  auto router = make_router(moe, 16);
  auto& relu = dynamic_cast<ReluRouterImpl&>(*router);
  EXPECT_FLOAT_EQ(relu.l1_coeff.item<float>(), 1e-8f);
  RouterStepStats stats;
  stats.active_fraction_all_layers = 0.9;  // far denser than the target 2/8
  router->update_after_step(stats);
  EXPECT_FLOAT_EQ(relu.l1_coeff.item<float>(), 1.2e-8f);
  // The coefficient is a checkpointed buffer.
  EXPECT_TRUE(router->named_buffers().contains("l1_coeff"));
}

TEST_F(RouterTest, BiasBalancingStepsTheBiasByTheDelta) {
  const auto counts = torch::tensor({10, 0, 5, 5}, torch::kLong);
  const auto delta = expert_bias_delta(counts, 1e-3);
  auto moe = testing::small_moe_config(RouterKind::kLinear);
  moe.num_experts = 4;
  moe.bias_balancing_rate = 1e-3;
  auto router = make_router(moe, 16);
  RouterStepStats stats;
  stats.routed_pairs_E = counts;
  router->update_after_step(stats);
  const auto& bias = dynamic_cast<TopKRouterImpl&>(*router).expert_bias;
  EXPECT_LT(max_abs_diff(bias, delta), 1e-9);
}

}  // namespace
}  // namespace yuanmoe::model
