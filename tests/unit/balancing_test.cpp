// The balancing room. moe.balance_scope (docs/routers.md, "Balancing scope"): the micro-batch
// loss unchanged, the sequence-wise loss against a per-sequence loop and finite differences, the
// global-batch loss over two data-parallel ranks (Gloo, ranks as threads) against one process
// holding the whole batch, activation recompute reusing its first
// run's statistics, the bias rule of each scope. The gating and loss functions (top-k with and
// without a selection bias, Switch, z-loss, ReMoE's L1 and its controller, the bias delta)
// against their formulas.
#include <numeric>

#include "support/fixtures.h"
#include "support/gradcheck.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/model/recompute.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/balance_reducer.h"
#include "yuanmoe/train/loss.h"

namespace yuanmoe::model {
namespace {

using config::BalanceScope;
using config::RouterKind;
using testing::max_abs_diff;
using BalanceScopeTest = testing::SeededTest;

constexpr int64_t kHidden = 12;

config::MoeConfig balance_config(RouterKind router, BalanceScope scope) {
  config::MoeConfig moe = testing::small_moe_config(router);
  moe.aux_loss_coeff = 0.1;
  moe.balance_scope = scope;
  return moe;
}

/// A layer in fp64 with weights large enough that the routing is uneven.
Moe make_layer(const config::MoeConfig& config, uint64_t seed = 11) {
  torch::manual_seed(seed);
  Moe moe(config, kHidden);
  moe->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  for (auto& p : moe->parameters()) p.normal_(0.0, 0.4);
  return moe;
}

std::map<std::string, Tensor> router_gradients(const Moe& moe) {
  std::map<std::string, Tensor> grads;
  for (const auto& p : moe->gate->named_parameters()) grads[p.key()] = p.value().grad().clone();
  return grads;
}

/// The router's aux loss of x and its router gradients.
std::pair<Tensor, std::map<std::string, Tensor>> aux_and_gradients(Moe& moe, const Tensor& x) {
  moe->zero_grad();
  moe->gate->begin_step();
  const Tensor aux = moe->forward(x).aux_loss;
  aux.backward();
  return {aux.detach(), router_gradients(moe)};
}

/// Explicit loops of the Switch formula over the listed tokens (docs/routers.md): E sum_i f_i P_i.
double switch_loss_loop(const Tensor& logits_TE, const Tensor& ids_TK, const std::vector<int64_t>& tokens) {
  const int64_t experts = logits_TE.size(1), k = ids_TK.size(1);
  if (tokens.empty()) return 0.0;
  const Tensor p = torch::softmax(logits_TE.to(torch::kDouble), -1);
  double loss = 0;
  for (int64_t i = 0; i < experts; ++i) {
    double f = 0, mean_p = 0;
    for (const int64_t t : tokens) {
      for (int64_t s = 0; s < k; ++s) f += ids_TK[t][s].item<int64_t>() == i ? 1.0 : 0.0;
      mean_p += p[t][i].item<double>();
    }
    f /= static_cast<double>(tokens.size() * k);
    mean_p /= static_cast<double>(tokens.size());
    loss += static_cast<double>(experts) * f * mean_p;
  }
  return loss;
}

// micro_batch, the default: the loss is the plain function of the linear
// router's logits, bit for bit, and that function is the formula written out.
TEST_F(BalanceScopeTest, MicroBatchIsThePlainLossBitForBit) {
  Moe moe = make_layer(balance_config(RouterKind::kLinear, BalanceScope::kMicroBatch));
  const Tensor x = torch::randn({2, 5, kHidden}, torch::kDouble);
  const Tensor aux = moe->forward(x).aux_loss;
  const auto& linear = dynamic_cast<LinearRouterImpl&>(*moe->gate);
  const Tensor logits_TE = torch::matmul(x.reshape({10, kHidden}), linear.weight.t());
  const Tensor ids_TK = std::get<1>(logits_TE.topk(2, -1));
  EXPECT_TRUE(torch::equal(aux, 0.1 * switch_load_balancing_loss(logits_TE, ids_TK)));
  std::vector<int64_t> all(10);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_NEAR(aux.item<double>(), 0.1 * switch_loss_loop(logits_TE, ids_TK, all), 1e-14);
}

// The bias statistics count every routed token and its k pairs.
TEST_F(BalanceScopeTest, BiasStatisticsCountEveryRoutedToken) {
  config::MoeConfig config = balance_config(RouterKind::kLinear, BalanceScope::kMicroBatch);
  config.bias_balancing_rate = 1e-3;
  Moe moe = make_layer(config);
  moe->gate->begin_step();
  moe->forward(torch::randn({10, kHidden}, torch::kDouble));
  const Tensor statistics = moe->gate->step_bias_statistics();
  EXPECT_EQ(statistics[config.num_experts].item<double>(), 10.0);                      // tokens
  EXPECT_EQ(statistics.narrow(0, 0, config.num_experts).sum().item<double>(), 20.0);  // their k = 2 pairs each
}

/// DeepSeek-V3 eq. 17-20 by loops over the tokens of each sequence, averaged over the sequences
/// (softmax probabilities, docs/routers.md).
double sequence_loss_loop(const Tensor& logits_TE, const Tensor& ids_TK, int64_t sequences) {
  const int64_t length = logits_TE.size(0) / sequences;
  double total = 0;
  for (int64_t b = 0; b < sequences; ++b) {
    std::vector<int64_t> tokens(static_cast<size_t>(length));
    std::iota(tokens.begin(), tokens.end(), b * length);
    total += switch_loss_loop(logits_TE, ids_TK, tokens);
  }
  return total / static_cast<double>(sequences);
}

TEST_F(BalanceScopeTest, SequenceLossIsThePerSequenceFormulaAndItsGradientsMatchFiniteDifferences) {
  const Tensor logits_TE = torch::randn({12, 8}, torch::kDouble) * 2;
  const Tensor ids_TK = std::get<1>(logits_TE.topk(2, -1));
  EXPECT_NEAR(sequence_load_balancing_loss(logits_TE, ids_TK, 3).item<double>(),
              sequence_loss_loop(logits_TE, ids_TK, 3), 1e-14);
  // One sequence is the micro-batch loss.
  EXPECT_NEAR(sequence_load_balancing_loss(logits_TE, ids_TK, 1).item<double>(),
              switch_load_balancing_loss(logits_TE, ids_TK).item<double>(), 1e-14);

  // The whole MoE layer with the sequence scope, in double, against finite differences.
  for (const RouterKind router : {RouterKind::kAttention, RouterKind::kLinear}) {
    config::MoeConfig config = balance_config(router, BalanceScope::kSequence);
    Moe moe = make_layer(config);
    const Tensor x = torch::randn({3, 4, kHidden}, torch::kDouble).requires_grad_(true);
    const Tensor projection = torch::randn({3, 4, kHidden}, torch::kDouble);
    const auto loss = [&] {
      const MoeOutput out = moe->forward(x);
      return (out.out * projection).sum() + out.aux_loss;
    };
    std::vector<testing::NamedTensor> inputs{{"x", x}};
    for (const auto& item : moe->gate->named_parameters()) inputs.push_back({item.key(), item.value()});
    testing::expect_gradients_match(loss, inputs);
  }
}

// Global batch at dp = 2, two micro-batches per rank, fewer tokens on one rank: the mean over the ranks of the loss, and the router
// gradients after the data-parallel mean, equal one process whose micro-batch i holds both
// ranks' micro-batch i. Without the factor ranks / (tokens of all ranks) of
// global_batch_load_balancing_loss the gradient would be half (Megatron-LM issue 3769).
TEST_F(BalanceScopeTest, GlobalBatchOverTwoRanksEqualsOneProcessOverTheWholeBatch) {
  for (const RouterKind router : {RouterKind::kAttention, RouterKind::kLinear}) {
    const config::MoeConfig config = balance_config(router, BalanceScope::kGlobalBatch);
    const int64_t ranks = 2, micro_batches = 2;
    const std::vector<std::vector<int64_t>> tokens{{3, 6}, {3, 5}};  // [micro-batch][rank]
    Moe whole = make_layer(config);
    std::vector<std::vector<Tensor>> x(micro_batches);  // [micro-batch][rank]: [T, D]
    for (int64_t i = 0; i < micro_batches; ++i) {
      for (int64_t r = 0; r < ranks; ++r) x[i].push_back(torch::randn({tokens[i][r], kHidden}, torch::kDouble));
    }

    whole->zero_grad();
    whole->gate->begin_step();
    double whole_loss = 0;
    for (int64_t i = 0; i < micro_batches; ++i) {
      const Tensor aux = whole->forward(torch::cat(x[i])).aux_loss;
      (aux / static_cast<double>(micro_batches)).backward();
      whole_loss += aux.item<double>() / static_cast<double>(micro_batches);
    }
    const std::map<std::string, Tensor> want = router_gradients(whole);

    std::vector<std::map<std::string, Tensor>> got(ranks);
    std::vector<double> losses(ranks);
    std::vector<Moe> layers{make_layer(config), make_layer(config)};  // the seed is global: not in the threads
    testing::on_ranks(ranks, 1, [&](parallel::ParallelContext& context) {
      const int64_t r = context.layout().dp_rank;
      Moe& layer = layers[static_cast<size_t>(r)];
      const auto reducer = parallel::make_balance_reducer(context);
      ASSERT_TRUE(reducer != nullptr);
      dynamic_cast<TopKRouterImpl&>(*layer->gate).balancer().set_reducer(reducer);
      layer->gate->begin_step();
      double loss = 0;
      for (int64_t i = 0; i < micro_batches; ++i) {
        const Tensor aux = layer->forward(x[i][r]).aux_loss;
        (aux / static_cast<double>(micro_batches)).backward();
        loss += aux.item<double>() / static_cast<double>(micro_batches);
      }
      for (auto& p : layer->gate->parameters()) {  // the data-parallel mean the optimizer takes
        Tensor& grad = p.mutable_grad();
        context.dp.all_reduce_sum(grad);
        grad.div_(static_cast<double>(ranks));
      }
      got[static_cast<size_t>(r)] = router_gradients(layer);
      losses[static_cast<size_t>(r)] = loss;
    });
    const std::string name = config::to_string(router);
    EXPECT_NEAR((losses[0] + losses[1]) / 2.0, whole_loss, 1e-12) << name;
    EXPECT_GT(std::abs(losses[0] - losses[1]), 1e-6) << name << ": the ranks' shares differ";
    for (const auto& [key, grad] : want) {
      EXPECT_GT(grad.abs().max().item<double>(), 1e-6) << name << key;
      for (const auto& rank_grads : got) EXPECT_LT(max_abs_diff(rank_grads.at(key), grad), 1e-12) << name << key;
    }
  }
}

// One process, one micro-batch: the global batch is the micro-batch.
TEST_F(BalanceScopeTest, GlobalBatchOfOneMicroBatchIsTheMicroBatchLoss) {
  Moe global = make_layer(balance_config(RouterKind::kAttention, BalanceScope::kGlobalBatch));
  Moe micro = make_layer(balance_config(RouterKind::kAttention, BalanceScope::kMicroBatch));
  const Tensor x = torch::randn({2, 5, kHidden}, torch::kDouble);
  const auto [aux_global, grads_global] = aux_and_gradients(global, x);
  const auto [aux_micro, grads_micro] = aux_and_gradients(micro, x);
  EXPECT_LT(max_abs_diff(aux_global, aux_micro), 1e-14);
  for (const auto& [key, grad] : grads_micro) EXPECT_LT(max_abs_diff(grads_global.at(key), grad), 1e-14) << key;
}

// train.recompute reruns each block in backward. When every forward of the step runs before any
// backward (GPipe on several stages), the step's counts have moved on when a block reruns. The
// rerun must balance with its first run's f and count nothing again: the step's gradients,
// losses and bias statistics equal those without recompute.
TEST_F(BalanceScopeTest, RecomputeRerunsWithTheFirstRunsStatistics) {
  const config::ModelConfig model_config = testing::small_model_config();
  for (const BalanceScope scope : {BalanceScope::kGlobalBatch, BalanceScope::kSequence}) {
    config::MoeConfig moe_config = balance_config(RouterKind::kLinear, scope);
    moe_config.bias_balancing_rate = 1e-3;
    torch::manual_seed(4);
    std::vector<Tensor> streams;
    for (int i = 0; i < 3; ++i) streams.push_back(torch::randint(model_config.vocab_size, {2, 9}));
    struct Run {
      std::map<std::string, Tensor> grads;
      double loss = 0;
      std::vector<Tensor> bias_statistics;
    };
    const auto run = [&](bool recompute) {
      Transformer model(model_config, moe_config);
      init_weights(*model, model_config, 7);
      model->to(torch::kDouble);
      apply_recompute(*model, recompute);
      model->train();
      for (Moe moe : model->moe_layers()) moe->gate->begin_step();
      Run result;
      std::vector<Tensor> losses;
      for (const Tensor& stream : streams) {  // every forward first
        const ModelOutput out = model->forward(stream.narrow(1, 0, 8), default_position_ids(2, 8));
        losses.push_back((train::language_model_loss(out.out, stream.narrow(1, 1, 8)) + out.aux_loss) / 3.0);
        result.loss += losses.back().item<double>();
      }
      for (const Tensor& loss : losses) loss.backward();  // then the backwards, with their reruns
      for (const auto& p : model->named_parameters()) result.grads[p.key()] = p.value().grad().clone();
      for (const Moe& moe : model->moe_layers()) result.bias_statistics.push_back(moe->gate->step_bias_statistics());
      return result;
    };
    const Run plain = run(false), recomputed = run(true);
    const std::string name = config::to_string(scope);
    EXPECT_NEAR(recomputed.loss, plain.loss, 1e-12) << name;
    for (const auto& [key, grad] : plain.grads) {
      EXPECT_LT(max_abs_diff(recomputed.grads.at(key), grad), 1e-10) << name << key;
    }
    ASSERT_EQ(recomputed.bias_statistics.size(), plain.bias_statistics.size());
    for (size_t l = 0; l < plain.bias_statistics.size(); ++l) {
      EXPECT_TRUE(torch::equal(recomputed.bias_statistics[l], plain.bias_statistics[l])) << name << " layer " << l;
    }
    // Sequence scope: 3 micro-batches of 2 sequences; global: 48 counted tokens.
    const double expected = scope == BalanceScope::kSequence ? 6.0 : 48.0;
    EXPECT_EQ(plain.bias_statistics.front()[moe_config.num_experts].item<double>(), expected) << name;
  }
}

// The bias rule of each scope (docs/routers.md): micro_batch and global_batch step on the sign
// of the step's load error (DeepSeek-V3's rule), sequence on the mean of each sequence's sign.
TEST_F(BalanceScopeTest, BiasRuleOfEachScope) {
  // Sequence 0: loads {3, 1, 0, 0} (mean 1): signs {-1, 0, +1, +1}; sequence 1: {0, 0, 2, 2}
  // (mean 1): {+1, +1, -1, -1}; sequence 2 has no pairs and is left out.
  const Tensor pairs_BE = torch::tensor({3., 1., 0., 0., 0., 0., 2., 2., 0., 0., 0., 0.}, torch::kDouble).view({3, 4});
  const Tensor signs_E1 = sequence_load_error_signs(pairs_BE);
  EXPECT_TRUE(torch::equal(signs_E1, torch::tensor({0., 1., 0., 0., 2.}, torch::kDouble)));
  const Tensor delta = sequence_expert_bias_delta(signs_E1, 1e-3);
  // Mean sign {0, 0.5, 0, 0} * rate, centred: {-1/8, 3/8, -1/8, -1/8} * 1e-3.
  EXPECT_LT(max_abs_diff(delta, torch::tensor({-0.125, 0.375, -0.125, -0.125}) * 1e-3), 1e-9);
  EXPECT_TRUE(torch::equal(sequence_expert_bias_delta(torch::zeros({5}, torch::kDouble), 1e-3), torch::zeros({4})));

  for (const BalanceScope scope : {BalanceScope::kMicroBatch, BalanceScope::kSequence, BalanceScope::kGlobalBatch}) {
    config::MoeConfig config = testing::small_moe_config(RouterKind::kLinear);
    config.num_experts = 4;
    config.bias_balancing_rate = 1e-3;
    config.balance_scope = scope;
    auto router = make_router(config, 16);
    RouterStepStats stats;
    stats.routed_pairs_E = torch::tensor({9, 9, 9, 9}, torch::kLong);  // not read: the bias statistics are
    stats.bias_statistics_E1 =
        scope == BalanceScope::kSequence ? signs_E1 : torch::tensor({10., 0., 5., 5., 10.}, torch::kDouble);
    router->update_after_step(stats);
    const Tensor want =
        scope == BalanceScope::kSequence ? delta : expert_bias_delta(torch::tensor({10, 0, 5, 5}), 1e-3);
    EXPECT_TRUE(torch::equal(dynamic_cast<TopKRouterImpl&>(*router).expert_bias, want)) << config::to_string(scope);
  }
}

// The gating and loss functions, each against its formula.
using GatingAndLossTest = testing::SeededTest;

TEST_F(GatingAndLossTest, TopOneGateIsTheRawProbabilityNotOne) {
  // docs/routers.md k = 1 trap: a renormalised single gate is always 1 and gives no gradient.
  const auto logits = torch::randn({6, 4}, torch::requires_grad());
  const TopKGates top = top_k_gates(logits, 1, {});
  const auto probs = torch::softmax(logits, -1);
  EXPECT_LT(max_abs_diff(top.gates_TK.squeeze(1), std::get<0>(probs.max(-1))), 1e-7);
  top.gates_TK.sum().backward();
  EXPECT_GT(logits.grad().abs().sum().item<double>(), 0);
}

TEST_F(GatingAndLossTest, SelectionBiasChangesTheChoiceButNotTheGateValues) {
  const auto logits = torch::tensor({{3.0f, 2.0f, 1.0f, 0.0f}});
  const auto bias = torch::tensor({0.0f, 0.0f, 0.0f, 10.0f});
  const TopKGates top = top_k_gates(logits, 2, bias);
  EXPECT_EQ(top.expert_ids_TK[0][0].item<int64_t>(), 3);
  EXPECT_EQ(top.expert_ids_TK[0][1].item<int64_t>(), 0);
  // Gates from the unbiased logits 0 and 3.
  const double e3 = std::exp(3.0), e0 = 1.0;
  EXPECT_NEAR(top.gates_TK[0][0].item<double>(), e0 / (e0 + e3), 1e-6);
  EXPECT_NEAR(top.gates_TK[0][1].item<double>(), e3 / (e0 + e3), 1e-6);
}

TEST_F(GatingAndLossTest, SwitchLossMatchesFormulaAndIsOneAtBalance) {
  const int64_t T = 6, E = 3, k = 2;
  const auto logits = torch::randn({T, E});
  const auto ids = std::get<1>(logits.topk(k, -1));
  double expected = 0;
  const auto probs = torch::softmax(logits, -1);
  for (int64_t e = 0; e < E; ++e) {
    const double f = (ids == e).sum().item<double>() / (T * k);
    const double p = probs.select(1, e).mean().item<double>();
    expected += E * f * p;
  }
  EXPECT_NEAR(switch_load_balancing_loss(logits, ids).item<double>(), expected, 1e-6);
  // Uniform probabilities and every expert chosen equally often.
  const auto uniform = torch::zeros({3, 3});
  const auto balanced = torch::tensor({0, 1, 1, 2, 2, 0}, torch::kLong).view({3, 2});
  EXPECT_NEAR(switch_load_balancing_loss(uniform, balanced).item<double>(), 1.0, 1e-6);
}

TEST_F(GatingAndLossTest, ZLossIsMeanSquaredLogSumExp) {
  const auto logits = torch::randn({5, 4});
  double expected = 0;
  for (int64_t t = 0; t < 5; ++t) {
    double sum = 0;
    for (int64_t e = 0; e < 4; ++e) sum += std::exp(logits[t][e].item<double>());
    expected += std::pow(std::log(sum), 2) / 5;
  }
  EXPECT_NEAR(router_z_loss(logits).item<double>(), expected, 1e-5);
}

TEST_F(GatingAndLossTest, ReluL1MatchesReferenceCodeFormula) {
  // ReMoE reference: E/(k T^2) * sum_e (sum_t R_te) * c_e, c_e = #tokens with R_te > 0.
  const int64_t T = 10, E = 4, k = 1;
  const auto gates = torch::relu(torch::randn({T, E}));
  double expected = 0;
  for (int64_t e = 0; e < E; ++e) {
    expected += gates.select(1, e).sum().item<double>() * (gates.select(1, e) > 0).sum().item<double>();
  }
  expected *= double(E) / (k * T * T);
  EXPECT_NEAR(relu_load_balanced_l1(gates, k).item<double>(), expected, 1e-5);
}

TEST_F(GatingAndLossTest, ReluCoefficientStepsByAlphaTowardsTheTarget) {
  EXPECT_DOUBLE_EQ(next_relu_l1_coeff(1.0, /*active*/ 0.5, /*target*/ 0.25, 1.2), 1.2);
  EXPECT_DOUBLE_EQ(next_relu_l1_coeff(1.2, 0.1, 0.25, 1.2), 1.0);
  EXPECT_DOUBLE_EQ(next_relu_l1_coeff(1.2, 0.25, 0.25, 1.2), 1.0);  // reference divides at equality
}

TEST_F(GatingAndLossTest, BiasDeltaRaisesUnderloadedExperts) {
  const auto delta = expert_bias_delta(torch::tensor({10, 0, 5, 5}, torch::kLong), 1e-3);
  EXPECT_LT(delta[0].item<double>(), 0);
  EXPECT_GT(delta[1].item<double>(), 0);
  EXPECT_NEAR(delta.sum().item<double>(), 0.0, 1e-9);  // centred
}

}  // namespace
}  // namespace yuanmoe::model
