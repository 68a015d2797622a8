// Incremental decoding: a prefill plus one-token steps, and chunked prefill, reproduce the full
// forward's logits for every router with and without LFA; the LFA state alone; generate() against
// argmax over repeated full forwards; seeded, reproducible sampling.
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <iostream>
#include <set>

#include "support/fixtures.h"
#include "yuanmoe/model/decode.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using DecodeTest = testing::SeededTest;

Transformer make_eval_model(const config::ModelConfig& model, const config::MoeConfig& moe) {
  Transformer t(model, moe);
  init_weights(*t, model);
  t->eval();  // routers add aux losses only while training
  return t;
}

/// Feeds ids_BS in consecutive chunks of the given sizes through one cache; returns the
/// concatenated logits [B, S, V].
Tensor incremental_logits(Transformer& t, const Tensor& ids_BS, const std::vector<int64_t>& chunks) {
  DecodeCache cache(*t);
  const auto positions_BS = default_position_ids(ids_BS.size(0), ids_BS.size(1));
  std::vector<Tensor> logits;
  int64_t start = 0;
  for (const int64_t len : chunks) {
    logits.push_back(
        t->forward(ids_BS.narrow(1, start, len), positions_BS.narrow(1, start, len), &cache).out);
    start += len;
    EXPECT_EQ(cache.num_tokens, start);
  }
  EXPECT_EQ(start, ids_BS.size(1));
  return torch::cat(logits, 1);
}

class IncrementalForwardTest
    : public testing::SeededTestWithParam<std::tuple<RouterKind, bool>> {};

TEST_P(IncrementalForwardTest, MatchesTheFullForward) {
  const auto [router, lfa] = GetParam();
  auto model = testing::small_model_config();
  model.lfa = lfa;
  auto t = make_eval_model(model, testing::small_moe_config(router));
  const auto ids = torch::randint(0, model.vocab_size, {2, 12}, torch::kLong);
  const std::vector<std::vector<int64_t>> schedules{{5, 1, 1, 1, 1, 1, 1, 1}, {3, 4, 5}};
  torch::NoGradGuard no_grad;
  for (const auto& [dtype, tolerance] :
       {std::pair{torch::kFloat, 1e-5}, std::pair{torch::kDouble, 1e-10}}) {
    t->to(dtype);
    const auto full = t(ids, default_position_ids(2, 12)).out;
    for (const auto& chunks : schedules) {
      const double diff = max_abs_diff(incremental_logits(t, ids, chunks), full);
      std::cout << "  " << config::to_string(router) << (lfa ? " lfa " : " no-lfa ") << dtype
                << " chunks " << c10::IntArrayRef(chunks) << ": max |incremental - full| = " << diff << "\n";
      EXPECT_LT(diff, tolerance) << dtype << " chunks " << c10::IntArrayRef(chunks);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(EveryRouterWithAndWithoutLfa,
                         IncrementalForwardTest,
                         ::testing::Combine(::testing::ValuesIn(testing::all_router_kinds()),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return config::to_string(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) ? "_lfa" : "_no_lfa");
                         });

TEST_F(DecodeTest, LfaStateContinuesTheFilters) {
  LocalizedFiltering lfa(16, 1e-6);
  torch::NoGradGuard no_grad;
  for (auto& p : lfa->parameters()) p.uniform_(-0.3, 0.3);
  for (const auto& [dtype, tolerance] :
       {std::pair{torch::kFloat, 1e-5}, std::pair{torch::kDouble, 1e-12}}) {
    lfa->to(dtype);
    const auto a = torch::randn({2, 9, 16}, dtype);
    const auto full = lfa(a);
    LfaState state;
    std::vector<Tensor> parts;
    int64_t start = 0;
    for (const int64_t len : {1, 3, 1, 4}) {
      parts.push_back(lfa(a.narrow(1, start, len), &state));
      start += len;
    }
    EXPECT_LT(max_abs_diff(torch::cat(parts, 1), full), tolerance) << dtype;
    EXPECT_TRUE(torch::equal(state.a_prev, a.narrow(1, 8, 1)));
    EXPECT_EQ(state.y1_prev.sizes(), (std::vector<int64_t>{2, 1, 8}));
  }
}

TEST_F(DecodeTest, CacheMustMatchTheModelLayers) {
  auto model = testing::small_model_config();
  auto t = make_eval_model(model, testing::small_moe_config());
  model.num_layers = 3;
  Transformer deeper(model, testing::small_moe_config());
  DecodeCache wrong(*deeper);
  const auto ids = torch::zeros({1, 2}, torch::kLong);
  EXPECT_THROW(t->forward(ids, default_position_ids(1, 2), &wrong), c10::Error);
}

TEST_F(DecodeTest, GreedyGenerationEqualsArgmaxOfFullForwards) {
  const auto model = testing::small_model_config();
  auto t = make_eval_model(model, testing::small_moe_config());
  const std::vector<int64_t> prompt{3, 14, 15, 92, 65};
  SamplingOptions options;
  options.max_new_tokens = 6;
  options.temperature = 0;

  std::vector<int64_t> sequence = prompt, expected;
  torch::NoGradGuard no_grad;
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    const auto n = static_cast<int64_t>(sequence.size());
    const auto ids = torch::tensor(sequence, torch::kLong).view({1, n});
    const int64_t next = t(ids, default_position_ids(1, n)).out[0][n - 1].argmax().item<int64_t>();
    expected.push_back(next);
    sequence.push_back(next);
  }
  EXPECT_EQ(generate(*t, prompt, options), expected);
}

TEST_F(DecodeTest, GenerationStopsAfterEos) {
  auto t = make_eval_model(testing::small_model_config(), testing::small_moe_config());
  SamplingOptions options;
  options.max_new_tokens = 8;
  options.temperature = 0;
  const auto greedy = generate(*t, {1, 2, 3}, options);
  options.eos_id = greedy[2];
  const auto stop = std::find(greedy.begin(), greedy.end(), options.eos_id) + 1;
  EXPECT_EQ(generate(*t, {1, 2, 3}, options), std::vector<int64_t>(greedy.begin(), stop));
}

TEST_F(DecodeTest, SamplingIsSeededAndTopOneIsGreedy) {
  auto t = make_eval_model(testing::small_model_config(), testing::small_moe_config());
  const std::vector<int64_t> prompt{7, 8, 9};
  SamplingOptions options;
  options.max_new_tokens = 10;
  options.temperature = 1.0;
  options.seed = 1;
  const auto first = generate(*t, prompt, options);
  EXPECT_EQ(generate(*t, prompt, options), first);
  options.seed = 2;
  // Random weights give near-uniform logits over 97 ids: equal 10-token draws are ~97^-10 likely.
  EXPECT_NE(generate(*t, prompt, options), first);

  options.top_k = 1;
  SamplingOptions greedy = options;
  greedy.temperature = 0;
  greedy.top_k = 0;
  EXPECT_EQ(generate(*t, prompt, options), generate(*t, prompt, greedy));
}

TEST_F(DecodeTest, TopKDrawsOnlyAmongTheLargestLogits) {
  const auto logits = torch::tensor({0.1, 2.0, -1.0, 1.9, 0.5});
  SamplingOptions options;
  options.top_k = 2;
  at::Generator generator = at::detail::createCPUGenerator(0);
  std::set<int64_t> drawn;
  for (int i = 0; i < 200; ++i) drawn.insert(sample_token(logits, options, generator));
  EXPECT_EQ(drawn, (std::set<int64_t>{1, 3}));
}

TEST_F(DecodeTest, GenerateRestoresTheModeAndLeavesTheGlobalGeneratorAlone) {
  auto t = make_eval_model(testing::small_model_config(), testing::small_moe_config());
  t->train();
  torch::manual_seed(3);
  const auto expected = torch::rand({4});
  torch::manual_seed(3);
  generate(*t, {1, 2}, SamplingOptions{});
  EXPECT_TRUE(torch::equal(torch::rand({4}), expected));
  EXPECT_TRUE(t->is_training());
  for (const auto& module : t->modules()) EXPECT_TRUE(module->is_training()) << module->name();
}

TEST_F(DecodeTest, RejectsSequencesLongerThanTheModel) {
  const auto model = testing::small_model_config();  // max_seq_length 64
  auto t = make_eval_model(model, testing::small_moe_config());
  SamplingOptions options;
  options.max_new_tokens = 5;
  EXPECT_THROW(generate(*t, std::vector<int64_t>(60, 1), options), c10::Error);
  options.max_new_tokens = 4;
  EXPECT_EQ(generate(*t, std::vector<int64_t>(60, 1), options).size(), 4u);
}

}  // namespace
}  // namespace yuanmoe::model
