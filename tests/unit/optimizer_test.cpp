// The optimizer (train/optimizer.h, train/distributed_optimizer.h): weight decay on matrices
// only, the data-parallel mean of the gradients and the tied embedding's sum on real Gloo groups
// (ranks as threads, support/on_ranks.h), the norm over pipeline stages and clipping, state by
// name across stage layouts, and the sharded AdamW against the replicated one.
#include <ATen/Parallel.h>

#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {
namespace {

using testing::on_ranks;

/// Every parameter's gradient set to `value(name)` (undefined where it returns an undefined tensor).
void set_gradients(model::TransformerImpl& model, const std::function<Tensor(const std::string&, const Tensor&)>& value) {
  for (auto& item : model.named_parameters()) item.value().mutable_grad() = value(item.key(), item.value());
}

/// The norm the step reads (train/step.cpp), on the host.
double gradient_norm(const DistributedOptimizer& optimizer) {
  return std::sqrt(optimizer.squared_gradient_norm().item<double>());
}

/// The optimizer a run builds for `model` (not sharded, no expert parallelism).
std::unique_ptr<DistributedOptimizer> replicated_optimizer(model::TransformerImpl& model,
                                                           const parallel::ParallelContext& context) {
  return std::make_unique<DistributedOptimizer>(model, config::TrainConfig{}, context, /*shard=*/false,
                                                parallel::expert_weights(model));
}

TEST(DistributedOptimizerGradientsTest, DataParallelRanksGetTheMeanGradient) {
  on_ranks(2, 1, [](parallel::ParallelContext& context) {
    const double rank = static_cast<double>(context.world().rank);
    model::Transformer model(testing::small_model_config(), testing::small_moe_config());
    const std::string never = "layers.0.input_layernorm.weight";  // no gradient on either rank
    set_gradients(*model, [&](const std::string& name, const Tensor& p) {
      return name == never ? Tensor() : torch::full_like(p, 1.0 + rank) * (1.0 + static_cast<double>(p.numel() % 7));
    });
    replicated_optimizer(*model, context)->reduce_gradients();
    for (const auto& item : model->named_parameters()) {
      const Tensor want = item.key() == never ? torch::zeros_like(item.value())  // zeros: every rank reduces one list
                                              : torch::full_like(item.value(), 1.5) * (1.0 + static_cast<double>(item.value().numel() % 7));
      EXPECT_TRUE(torch::equal(item.value().grad(), want)) << item.key();
    }
  });
}

TEST(DistributedOptimizerGradientsTest, TiedEmbeddingCopiesSumAndTheNormSpansTheStagesOnce) {
  const config::ModelConfig model_config = testing::small_model_config();
  ASSERT_TRUE(model_config.tie_embeddings);
  on_ranks(2, 2, [&](parallel::ParallelContext& context) {
    const int64_t stage = context.layout().stage;
    model::Transformer model(model_config, testing::small_moe_config(),
                             model::balanced_stage(model_config.num_layers, 2, stage));
    // 1 on the first stage, 2 on the last; the embedding too, held by both.
    set_gradients(*model, [&](const std::string&, const Tensor& p) { return torch::full_like(p, stage + 1.0); });
    const auto optimizer = replicated_optimizer(*model, context);
    optimizer->reduce_gradients();
    EXPECT_TRUE(torch::equal(model->embed_tokens->weight.grad(), torch::full_like(model->embed_tokens->weight, 3.0)));
    // The norm counts every stage's own parameters and the embedding once: sum of n_s (s + 1)^2
    // over the stages' other parameters n_s, plus 3^2 for each embedding entry.
    const auto own_elements = [&](int64_t s) {
      model::Transformer other(model_config, testing::small_moe_config(),
                               model::balanced_stage(model_config.num_layers, 2, s));
      int64_t n = 0;
      for (const auto& item : other->named_parameters()) n += item.key().rfind("embed_tokens.", 0) == 0 ? 0 : item.value().numel();
      return static_cast<double>(n);
    };
    const double embedding = static_cast<double>(model->embed_tokens->weight.numel());
    EXPECT_NEAR(gradient_norm(*optimizer), std::sqrt(own_elements(0) * 1.0 + own_elements(1) * 4.0 + embedding * 9.0),
                1e-9);
  });
}

TEST(DistributedOptimizerGradientsTest, StepClipsToTheMaxNormAndTheNormIsReportedBeforeClipping) {
  model::Transformer model(testing::small_model_config(), testing::small_moe_config());
  parallel::ParallelContext single_process;
  const auto optimizer = replicated_optimizer(*model, single_process);
  const std::string first = "layers.0.input_layernorm.weight", second = "norm.weight";
  set_gradients(*model, [&](const std::string& name, const Tensor& p) {
    if (name == first) return torch::full_like(p, 3.0 / std::sqrt(static_cast<double>(p.numel())));
    if (name == second) return torch::full_like(p, 4.0 / std::sqrt(static_cast<double>(p.numel())));
    return Tensor();
  });
  optimizer->reduce_gradients();
  const double norm = gradient_norm(*optimizer);
  EXPECT_NEAR(norm, 5.0, 1e-6);
  const Tensor before = model->named_parameters()[first].grad().clone();
  optimizer->step(/*max_norm=*/0.0, norm);  // 0: report only
  EXPECT_TRUE(torch::equal(model->named_parameters()[first].grad(), before));
  optimizer->step(/*max_norm=*/1.0, norm);
  EXPECT_NEAR(gradient_norm(*optimizer), 1.0, 1e-6);
}

// The squared norm against fp64 copies squared and summed: lengths around the chunk and lane
// sizes, fp32 and fp64, a parameter without a gradient; the same bits at 1 and 2 threads.
TEST(DistributedOptimizerGradientsTest, SquaredNormAccumulatesInFp64WhateverTheThreads) {
  std::vector<Tensor> parameters;
  for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{65535}, int64_t{65536}, int64_t{200003}}) {
    for (const auto dtype : {torch::kFloat, torch::kDouble}) {
      Tensor p = torch::zeros({n}, dtype);
      p.mutable_grad() = torch::randn({n}, dtype) * 1e-3;
      parameters.push_back(p);
    }
  }
  parameters.push_back(torch::zeros({5}));  // no gradient: left out
  double want = 0.0;
  for (const Tensor& p : parameters) {
    if (p.grad().defined()) want += p.grad().to(torch::kDouble).pow(2).sum().item<double>();
  }
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const double one = squared_gradient_sum(parameters, torch::kCPU).item<double>();
  at::set_num_threads(2);
  const double two = squared_gradient_sum(parameters, torch::kCPU).item<double>();
  at::set_num_threads(threads);
  EXPECT_EQ(one, two);
  EXPECT_NEAR(one, want, 1e-13 * want);
  EXPECT_EQ(squared_gradient_sum({torch::zeros({3})}, torch::kCPU).item<double>(), 0.0);
}

TEST(DistributedOptimizerTest, DecaysMatricesNotVectors) {
  const config::ModelConfig model_config = testing::small_model_config();
  model::Transformer model(model_config, testing::small_moe_config());
  model::init_weights(*model, model_config, 1);
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    const bool is_norm_or_bias =
        name.find("norm") != std::string::npos || (name.size() > 5 && name.substr(name.size() - 5) == ".bias");
    EXPECT_EQ(uses_weight_decay(item.value()), !is_norm_or_bias) << name;
  }
  // Zero gradients: AdamW's update is zero, so a step is the decay alone, p (1 - lr wd).
  config::TrainConfig train;
  train.lr = 0.5;
  train.weight_decay = 0.1;
  parallel::ParallelContext single_process;
  DistributedOptimizer optimizer(*model, train, single_process, /*shard=*/false, parallel::expert_weights(*model));
  std::map<std::string, Tensor> before;
  for (const auto& item : model->named_parameters()) before[item.key()] = item.value().detach().clone();
  set_gradients(*model, [](const std::string&, const Tensor& p) { return torch::zeros_like(p); });
  optimizer.step(/*max_norm=*/0.0, 0.0);
  for (const auto& item : model->named_parameters()) {
    const Tensor want = uses_weight_decay(item.value()) ? before[item.key()] * (1.0 - 0.5 * 0.1) : before[item.key()];
    EXPECT_LT(testing::max_abs_diff(item.value(), want), 1e-7) << item.key();
  }
}

// The state of a whole model's optimizer, loaded into the optimizer of a pipeline stage (other
// parameters at other positions, and the tied embedding's copy), is the same state under every
// name, and steps the same.
TEST(DistributedOptimizerTest, StateFollowsNamesNotPositions) {
  const config::ModelConfig model_config = testing::small_model_config();
  const config::MoeConfig moe_config = testing::small_moe_config(config::RouterKind::kLinear);
  config::TrainConfig train;
  train.lr = 1e-2;
  parallel::ParallelContext single_process;
  model::Transformer whole(model_config, moe_config);
  model::init_weights(*whole, model_config, 1);
  DistributedOptimizer whole_optimizer(*whole, train, single_process, false, parallel::expert_weights(*whole));
  const auto ids = torch::randint(model_config.vocab_size, {2, 6});
  whole(ids, model::default_position_ids(2, 6)).out.pow(2).mean().backward();
  whole_optimizer.step(0.0, 0.0);

  model::Transformer last(model_config, moe_config, model::balanced_stage(model_config.num_layers, 2, 1));
  const auto whole_parameters = whole->named_parameters();
  for (auto& item : last->named_parameters()) item.value().detach().copy_(whole_parameters[item.key()]);
  DistributedOptimizer last_optimizer(*last, train, single_process, false, parallel::expert_weights(*last));
  checkpoint::NamedTensors for_last;
  const auto last_parameters = last->named_parameters();
  for (const auto& [name, t] : whole_optimizer.state_by_name()) {
    if (last_parameters.contains(name.substr(0, name.rfind('/')))) for_last.emplace_back(name, t);
  }
  ASSERT_NE(for_last.size(), whole_optimizer.state_by_name().size());
  last_optimizer.load_state_by_name(for_last, "whole");
  const checkpoint::NamedTensors state = last_optimizer.state_by_name();
  ASSERT_EQ(state.size(), for_last.size());
  for (size_t i = 0; i < state.size(); ++i) {
    EXPECT_EQ(state[i].first, for_last[i].first);
    EXPECT_TRUE(torch::equal(state[i].second, for_last[i].second)) << state[i].first;
  }
  // The same gradients: the same step.
  set_gradients(*whole, [](const std::string&, const Tensor& p) { return torch::full_like(p, 0.25); });
  set_gradients(*last, [](const std::string&, const Tensor& p) { return torch::full_like(p, 0.25); });
  whole_optimizer.step(0.0, 0.0);
  last_optimizer.step(0.0, 0.0);
  for (const auto& item : last->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), whole_parameters[item.key()])) << item.key();
  }
  EXPECT_THROW(last_optimizer.load_state_by_name({{"nope/step", torch::tensor(1)}}, "test"), std::runtime_error);
}

TEST(DistributedOptimizerTest, ShardedEqualsReplicatedHoldsHalfTheStateAndRoundTrips) {
  const config::ModelConfig model_config = testing::small_model_config();
  const config::MoeConfig moe_config = testing::small_moe_config();
  config::TrainConfig train;
  train.lr = 1e-2;
  train.weight_decay = 0.1;
  on_ranks(2, 1, [&](parallel::ParallelContext& context) {
    std::vector<model::Transformer> models;
    std::vector<std::unique_ptr<DistributedOptimizer>> optimizers;
    for (const bool shard : {false, true}) {
      models.emplace_back(model_config, moe_config);
      model::init_weights(*models.back(), model_config, 3);
      optimizers.push_back(std::make_unique<DistributedOptimizer>(*models.back(), train, context, shard,
                                                                          parallel::expert_weights(*models.back())));
    }
    for (int step = 0; step < 3; ++step) {
      for (size_t m = 0; m < 2; ++m) {
        // The same gradients for both optimizers; a generator per rank (the ranks are threads).
        at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(100 * step + context.world().rank);
        for (const Tensor& p : models[m]->parameters()) {
          p.mutable_grad() = torch::randn(p.sizes(), generator, p.options());
        }
        optimizers[m]->reduce_gradients();
        const double norm = gradient_norm(*optimizers[m]);
        optimizers[m]->step(/*max_norm=*/1.0, norm);
      }
    }
    const auto a = models[0]->named_parameters(), b = models[1]->named_parameters();
    for (const auto& p : a) EXPECT_LT(testing::max_abs_diff(p.value(), b[p.key()]), 1e-6) << p.key();
    const checkpoint::NamedTensors replicated = optimizers[0]->state_by_name(), sharded = optimizers[1]->state_by_name();
    ASSERT_EQ(replicated.size(), sharded.size());
    for (size_t i = 0; i < replicated.size(); ++i) {
      EXPECT_EQ(replicated[i].first, sharded[i].first);
      EXPECT_LT(testing::max_abs_diff(replicated[i].second.to(torch::kDouble), sharded[i].second.to(torch::kDouble)),
                1e-6)
          << replicated[i].first;
    }
    const double ratio = static_cast<double>(optimizers[1]->state_bytes()) / optimizers[0]->state_bytes();
    EXPECT_NEAR(ratio, 0.5, 0.01);

    // Saved state loaded into a fresh sharded optimizer reads back the same.
    model::Transformer fresh(model_config, moe_config);
    model::init_weights(*fresh, model_config, 3);
    DistributedOptimizer reloaded(*fresh, train, context, /*shard=*/true, parallel::expert_weights(*fresh));
    reloaded.load_state_by_name(sharded, "test");
    const checkpoint::NamedTensors again = reloaded.state_by_name();
    ASSERT_EQ(again.size(), sharded.size());
    for (size_t i = 0; i < again.size(); ++i) EXPECT_TRUE(torch::equal(again[i].second, sharded[i].second)) << again[i].first;
    EXPECT_THROW(reloaded.load_state_by_name({{"nope/step", torch::tensor(1)}}, "test"), std::runtime_error);
  });
}

}  // namespace
}  // namespace yuanmoe::train
