// data.blend: Megatron's blending rule against the formula written out, the shares it gives,
// each source's own shuffled, epoched stream, state independent of the data-parallel layout,
// and every bad blend named in one line (docs/data.md, "Blends").
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "support/temp_dir.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/data/blend.h"
#include "yuanmoe/data/indexed_dataset.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/train/evaluate.h"

namespace yuanmoe::data {
namespace {

using testing::TempDir;
constexpr int64_t kEod = 0;

/// Documents of 5..34 tokens in [first, first + 40), ending in EOD: a sample's source is plain from
/// its tokens (source 0 below 100, source 1 from 100, source 2 from 200).
std::shared_ptr<const IndexedDataset> source_dataset(const TempDir& dir, const std::string& name, int32_t first,
                                                     int documents, uint32_t seed) {
  IndexedDatasetWriter writer(dir / name, DType::kUInt16);
  std::mt19937 rng(seed);
  for (int d = 0; d < documents; ++d) {
    std::vector<int32_t> doc;
    const int n = 5 + static_cast<int>(rng() % 30);
    for (int i = 0; i < n; ++i) doc.push_back(first + static_cast<int32_t>(rng() % 40));
    doc.push_back(kEod);
    writer.add_document(doc.data(), doc.size());
  }
  writer.finish();
  return std::make_shared<const IndexedDataset>(dir / name);
}

SamplerOptions blend_options(int64_t rank, int64_t world, int64_t batch) {
  SamplerOptions o;
  o.seq_length = 8;
  o.micro_batch_size = batch;
  o.rank = rank;
  o.world_size = world;
  o.seed = 1234;
  o.eod_id = kEod;
  o.reset_position_ids = true;
  return o;
}

/// The source a sample's tokens come from (every token but EOD is in its source's range).
int64_t source_of(const torch::Tensor& row) {
  const int64_t top = row.max().item<int64_t>();
  return top / 100;
}

struct Sources {
  TempDir dir;
  std::vector<std::shared_ptr<const IndexedDataset>> datasets;
  // web: 150 documents (about 300 samples of 8 tokens per epoch); code: 30 (about 60), so code
  // runs through several epochs in 1,000 samples.
  Sources() {
    datasets.push_back(source_dataset(dir, "web", 1, 150, 11));
    datasets.push_back(source_dataset(dir, "code", 100, 30, 12));
  }
  BlendedSampler sampler(int64_t rank, int64_t world, int64_t batch, std::vector<double> weights = {0.7, 0.3}) const {
    std::vector<SamplerOptions> per_source(datasets.size(), blend_options(rank, world, batch));
    return BlendedSampler(datasets, weights, per_source, blend_options(rank, world, batch));
  }
};

/// Megatron's build_blending_indices written out: for sample i, the source j maximising
/// w_j * max(i, 1) - n_j with w normalised, the first on ties.
std::vector<int64_t> explicit_blend(const std::vector<double>& raw, int64_t size) {
  double sum = 0.0;
  for (double w : raw) sum += w;
  std::vector<double> w;
  for (double x : raw) w.push_back(x / sum);
  std::vector<int64_t> n(raw.size(), 0), out;
  for (int64_t i = 0; i < size; ++i) {
    const double x = i > 1 ? static_cast<double>(i) : 1.0;
    size_t best = 0;
    for (size_t j = 1; j < w.size(); ++j) {
      if (w[j] * x - static_cast<double>(n[j]) > w[best] * x - static_cast<double>(n[best])) best = j;
    }
    out.push_back(static_cast<int64_t>(best));
    ++n[best];
  }
  return out;
}

TEST(Blend, SharesFollowTheWeightsAndTheRuleIsMegatrons) {
  const Sources sources;
  BlendedSampler sampler = sources.sampler(0, 1, 4);
  const std::vector<int64_t> expected = explicit_blend({0.7, 0.3}, 1000);
  std::vector<int64_t> counts(2, 0);
  for (int step = 0; step < 250; ++step) {  // 1,000 samples
    const Batch batch = sampler.next_batch();
    for (int64_t b = 0; b < 4; ++b) {
      const int64_t i = step * 4 + b;
      const int64_t from_tokens = source_of(batch.tokens[b]);
      ASSERT_EQ(from_tokens, expected[static_cast<size_t>(i)]) << "sample " << i;
      ASSERT_EQ(sampler.batch_sources()[static_cast<size_t>(b)], from_tokens) << "sample " << i;
      ++counts[static_cast<size_t>(from_tokens)];
    }
  }
  EXPECT_NEAR(counts[0] / 1000.0, 0.7, 0.01);
  EXPECT_NEAR(counts[1] / 1000.0, 0.3, 0.01);
  EXPECT_LE(std::abs(counts[0] - 700), 1);  // the rule keeps every prefix within one sample of its share
  EXPECT_EQ(sampler.state().counts, counts);
  EXPECT_EQ(sampler.state().samples, 1000);
}

TEST(Blend, RuleMatchesTheFormulaForManyWeights) {
  // Unnormalised weights, ties (equal weights: the lowest index first), tiny shares.
  for (const std::vector<double>& weights :
       std::vector<std::vector<double>>{{1, 1}, {2, 1, 1}, {0.05, 0.9, 0.05}, {3, 7}, {1e-3, 1}, {0.2, 0.2, 0.2, 0.4}}) {
    const std::vector<double> w = normalise_blend_weights(weights);
    std::vector<int64_t> counts(weights.size(), 0);
    const std::vector<int64_t> expected = explicit_blend(weights, 2000);
    for (int64_t i = 0; i < 2000; ++i) {
      const int64_t j = blend_source(w, counts, i);
      ASSERT_EQ(j, expected[static_cast<size_t>(i)]) << "sample " << i << " of blend " << weights.size();
      ++counts[static_cast<size_t>(j)];
    }
    for (size_t j = 0; j < w.size(); ++j) EXPECT_LE(std::abs(counts[j] - w[j] * 2000), 1.0) << j;
  }
  EXPECT_EQ(explicit_blend({1, 1}, 4), (std::vector<int64_t>{0, 1, 0, 1}));  // i = 0 and 1 both use max(i, 1)
}

TEST(Blend, EachSourceIsItsOwnShuffledEpochedStream) {
  // The samples source j receives, in order, are the batches of a GptSampler over its dataset
  // with seed blend_source_seed(1234, j): its own permutation, its own epochs.
  const Sources sources;
  BlendedSampler blend = sources.sampler(0, 1, 1);
  std::vector<std::unique_ptr<GptSampler>> alone;
  for (int64_t j = 0; j < 2; ++j) {
    SamplerOptions o = blend_options(0, 1, 1);
    o.seed = blend_source_seed(1234, j);
    alone.push_back(std::make_unique<GptSampler>(sources.datasets[static_cast<size_t>(j)], o));
  }
  EXPECT_NE(blend_source_seed(1234, 0), blend_source_seed(1234, 1));
  EXPECT_NE(blend_source_seed(1234, 0), blend_source_seed(1235, 0));
  EXPECT_EQ(blend_source_seed(1234, 0), 13807455204797663926ULL);  // the values docs/data.md shows
  EXPECT_EQ(blend_source_seed(1234, 1), 9881088658733990476ULL);
  for (int i = 0; i < 1000; ++i) {
    const Batch batch = blend.next_batch();
    const int64_t j = blend.batch_sources()[0];
    const Batch expected = alone[static_cast<size_t>(j)]->next_batch();
    ASSERT_TRUE(torch::equal(batch.tokens, expected.tokens)) << "sample " << i;
    ASSERT_TRUE(torch::equal(batch.labels, expected.labels)) << "sample " << i;
    ASSERT_TRUE(torch::equal(batch.position_ids, expected.position_ids)) << "sample " << i;
  }
  for (int64_t j = 0; j < 2; ++j) EXPECT_EQ(blend.state().sources[static_cast<size_t>(j)], alone[static_cast<size_t>(j)]->state());
  EXPECT_GE(blend.state().sources[1].epoch, 3);  // code went round several times
}

std::vector<Batch> take(BlendedSampler& sampler, int n) {
  std::vector<Batch> out;
  for (int i = 0; i < n; ++i) out.push_back(sampler.next_batch());
  return out;
}

TEST(Blend, StateSavedAtOneDataParallelLayoutContinuesAtAnother) {
  const Sources sources;
  // One process, 8 samples per call: the reference order.
  BlendedSampler straight = sources.sampler(0, 1, 8);
  const std::vector<Batch> reference = take(straight, 40);

  // dp = 2 (4 samples each) for 20 calls: rank r holds samples [4r, 4r + 4) of each block of 8.
  BlendedSampler rank0 = sources.sampler(0, 2, 4), rank1 = sources.sampler(1, 2, 4);
  for (int step = 0; step < 20; ++step) {
    const Batch a = rank0.next_batch(), b = rank1.next_batch();
    ASSERT_TRUE(torch::equal(torch::cat({a.tokens, b.tokens}), reference[step].tokens)) << step;
    ASSERT_TRUE(torch::equal(torch::cat({a.position_ids, b.position_ids}), reference[step].position_ids)) << step;
  }
  ASSERT_EQ(rank0.state(), rank1.state());
  nlohmann::json saved;
  to_json(saved, rank0.state());
  const std::string text = saved.dump();

  // ... continued at dp = 1 (8 samples) and at dp = 4 (2 samples each) from the JSON state.
  BlendedSampler one = sources.sampler(0, 1, 8);
  one.set_state(nlohmann::json::parse(text).get<BlendState>());
  std::vector<BlendedSampler> four;
  for (int64_t r = 0; r < 4; ++r) {
    four.push_back(sources.sampler(r, 4, 2));
    four.back().set_state(nlohmann::json::parse(text).get<BlendState>());
  }
  for (int step = 20; step < 40; ++step) {
    ASSERT_TRUE(torch::equal(one.next_batch().tokens, reference[step].tokens)) << step;
    std::vector<torch::Tensor> parts;
    for (auto& rank : four) parts.push_back(rank.next_batch().tokens);
    ASSERT_TRUE(torch::equal(torch::cat(parts), reference[step].tokens)) << step;
  }
  EXPECT_EQ(one.state(), straight.state());
  EXPECT_EQ(four[3].state(), straight.state());
}

TEST(Blend, BadStatesAndWeightsAreNamed) {
  const Sources sources;
  BlendedSampler sampler = sources.sampler(0, 1, 2);
  take(sampler, 3);
  nlohmann::json j;
  to_json(j, sampler.state());
  EXPECT_EQ(j["samples"], 6);
  EXPECT_EQ(j["sources"].size(), 2u);
  nlohmann::json missing = j;
  missing["sources"][1].erase("cursor");
  EXPECT_THROW(missing.get<BlendState>(), std::invalid_argument);
  nlohmann::json wrong_total = j;
  wrong_total["samples"] = 7;
  try {
    wrong_total.get<BlendState>();
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("add up to 6, not 7"), std::string::npos) << e.what();
  }
  BlendState three = sampler.state();
  three.sources.push_back(three.sources.back());
  three.counts.push_back(0);
  EXPECT_THROW(sampler.set_state(three), std::invalid_argument);
  BlendState past_end = sampler.state();
  past_end.sources[1].cursor = 1000000;
  try {
    sampler.set_state(past_end);
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("code"), std::string::npos) << e.what();  // names the source's prefix
  }
  EXPECT_THROW(normalise_blend_weights({0.5, 0.0}), std::invalid_argument);
  EXPECT_THROW(normalise_blend_weights({0.5, -1.0}), std::invalid_argument);
  EXPECT_THROW(normalise_blend_weights({}), std::invalid_argument);
  EXPECT_THROW(normalise_blend_weights({1e308, 1e308}), std::invalid_argument);
  EXPECT_THROW(sources.sampler(0, 1, 2, {1.0}), std::invalid_argument);  // two datasets, one weight
}

TEST(Blend, EvaluationOfABlendWeighsTheSourcesLosses) {
  train::EvalResult a, b;
  a.loss_sum = 2.0 * 100;
  a.tokens = 100;
  a.batches = 2;
  a.routed_pairs_LE = torch::tensor({{3, 1}}, torch::kLong);
  a.finish();
  b.loss_sum = 4.0 * 50;
  b.tokens = 50;
  b.batches = 1;
  b.routed_pairs_LE = torch::tensor({{1, 3}}, torch::kLong);
  b.finish();
  const train::EvalResult mixed = train::blend_eval_result({a, b}, {0.7, 0.3});
  EXPECT_DOUBLE_EQ(mixed.loss, (0.7 * 2.0 + 0.3 * 4.0) / (0.7 + 0.3));
  EXPECT_DOUBLE_EQ(mixed.perplexity, std::exp(mixed.loss));
  EXPECT_EQ(mixed.tokens, 150);
  EXPECT_EQ(mixed.batches, 3);
  EXPECT_TRUE(torch::equal(mixed.routed_pairs_LE, torch::tensor({{4, 4}}, torch::kLong)));
  EXPECT_DOUBLE_EQ(mixed.expert_share_LE[0][0].item<double>(), 0.5);
  EXPECT_DOUBLE_EQ(train::blend_eval_result({a, b}, {7, 3}).loss, mixed.loss);  // weights are normalised
}

}  // namespace
}  // namespace yuanmoe::data

namespace yuanmoe::config {
namespace {

using nlohmann::json;

json blend_config(const json& blend) {
  json root = json::parse(R"({
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
              "rotary_dim": 16, "vocab_size": 256, "max_seq_length": 64},
    "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 96},
    "train": {"seq_length": 64, "max_steps": 10}
  })");
  root["data"]["blend"] = blend;
  return root;
}

/// Every issue of parsing and validating, one line each.
std::string problems(const json& root) {
  ParseResult parsed = parse_config(root);
  auto issues = parsed.issues;
  if (issues.empty()) issues = validate(parsed.config);
  std::string out;
  for (const auto& issue : issues) out += issue.to_string() + "\n";
  return out;
}

TEST(BlendConfig, ObjectAndFlatFormsParseAlikeAndRoundTrip) {
  const ParseResult objects = parse_config(blend_config(json::parse(R"([
      {"prefix": "data/web_train", "weight": 0.7, "valid_prefix": "data/web_valid"},
      {"prefix": "data/code_train", "weight": 0.3, "name": "code"}])")));
  ASSERT_TRUE(objects.issues.empty());
  EXPECT_TRUE(validate(objects.config).empty());
  const auto& blend = *objects.config.data.blend;
  ASSERT_EQ(blend.size(), 2u);
  EXPECT_EQ(blend[0], (BlendEntry{"data/web_train", 0.7, "data/web_valid", ""}));
  EXPECT_EQ(blend_source_name(blend[0]), "web_train");
  EXPECT_EQ(blend_source_name(blend[1]), "code");

  const ParseResult flat = parse_config(blend_config(json::parse(R"([0.7, "data/web_train", 3, "data/code_train"])")));
  ASSERT_TRUE(flat.issues.empty());
  EXPECT_EQ((*flat.config.data.blend)[1], (BlendEntry{"data/code_train", 3.0, "", ""}));

  // The resolved config (config.resolved.json, checkpoints) reads back the same.
  const ParseResult again = parse_config(to_json(objects.config));
  ASSERT_TRUE(again.issues.empty());
  EXPECT_EQ(*again.config.data.blend, blend);
  EXPECT_TRUE(to_json(RunConfig{})["data"]["blend"].is_null());  // absent: null
  EXPECT_FALSE(parse_config(to_json(RunConfig{})).config.data.blend);

  // Training needs data.train_prefix or data.blend, not both.
  RunConfig run = objects.config;
  EXPECT_TRUE(validate_training(run, 1).empty());
  run.data.train_prefix = "data/x";
  EXPECT_NE(problems(to_json(run)).find("data.blend: and data.train_prefix are both set"), std::string::npos)
      << problems(to_json(run));
}

TEST(BlendConfig, BadBlendsAreOneLineNamingTheEntry) {
  const auto expect_problem = [](const json& blend, const std::string& line) {
    const std::string found = problems(blend_config(blend));
    EXPECT_NE(found.find(line), std::string::npos) << "blend " << blend.dump() << " gave:\n" << found;
  };
  expect_problem(json::array(), "data.blend: is empty");
  expect_problem(json::parse(R"([0.7, "a", 0.3])"), "data.blend: Megatron's flat form [weight, prefix, weight, "
                                                    "prefix, ...] needs an even number of items, got 3");
  expect_problem(json::parse(R"([0.7, "a", -0.3, "b"])"), "data.blend[1]: weight must be > 0, got -0.3 (prefix \"b\")");
  expect_problem(json::parse(R"([{"prefix": "a", "weight": 1}, {"prefix": "b", "weight": 0}])"),
                 "data.blend[1]: weight must be > 0, got 0");
  expect_problem(json::parse(R"(["a", 0.7])"), "data.blend[0]: expected a weight (number) before its prefix");
  expect_problem(json::parse(R"([0.7, 5])"), "data.blend[1]: expected a prefix (string) after weight 0.7");
  expect_problem(json::parse(R"([{"prefix": "a"}])"), "data.blend[0].weight: required key is missing");
  expect_problem(json::parse(R"([{"prefix": "a", "weight": 1, "wieght": 2}])"), "data.blend[0].wieght: unknown key");
  expect_problem(json::parse(R"([{"prefix": "a", "weight": "1"}])"), "data.blend[0].weight: expected a number");
  expect_problem(json::parse(R"([{"prefix": "a", "weight": 1}, 0.5, "b"])"), "data.blend[1]: expected a {");
  expect_problem(json::parse(R"([1, "x/text_document", 1, "y/text_document"])"),
                 "data.blend[1]: name \"text_document\" is also data.blend[0]'s");
  expect_problem(json::parse(R"("data/web")"), "data.blend: expected a list");
  expect_problem(json::parse(R"([{"prefix": "", "weight": 1}])"), "data.blend[0]: prefix is empty");
}

TEST(BlendConfig, CommaSplitOverridesAreJoinedBack) {
  // What cxxopts makes of --set 'data.blend=[0.7,"a",0.3,"b"]' --set train.lr=1,train.seed=3.
  EXPECT_EQ(join_override_pieces({"data.blend=[0.7", "\"a\"", "0.3", "\"b\"]", "train.lr=1", "train.seed=3"}),
            (std::vector<std::string>{"data.blend=[0.7,\"a\",0.3,\"b\"]", "train.lr=1", "train.seed=3"}));
  EXPECT_EQ(join_override_pieces({"data.blend=[{\"prefix\":\"a\"", "\"weight\":1}]"}),
            (std::vector<std::string>{"data.blend=[{\"prefix\":\"a\",\"weight\":1}]"}));
  EXPECT_EQ(join_override_pieces({"moe.router"}), (std::vector<std::string>{"moe.router"}));  // still an error
}

TEST(BlendConfig, SetOnTheCommandLineAsJson) {
  json root = blend_config(nullptr);
  apply_override(root, R"(data.blend=[0.7,"data/web",0.3,"data/code"])");
  const ParseResult parsed = parse_config(root);
  ASSERT_TRUE(parsed.issues.empty());
  EXPECT_EQ(parsed.config.data.blend->size(), 2u);
}

}  // namespace
}  // namespace yuanmoe::config
