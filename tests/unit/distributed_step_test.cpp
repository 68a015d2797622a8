// The step's collectives on real Gloo process groups, two ranks as two threads of this process
// (the same c10d code as two processes, without the multi-process launch of python.parallel):
// run_pipeline_step over two stages against the one-process gradients, and the expert bias of
// every moe.balance_scope kept the same on every rank.
#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/balance_reducer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/pipeline.h"
#include "yuanmoe/train/step.h"

namespace yuanmoe::train {
namespace {

using testing::on_ranks;

TEST(PipelineStepTest, TwoStagesGiveTheOneProcessGradients) {
  const config::ModelConfig model_config = testing::small_model_config();
  const config::MoeConfig moe_config = testing::small_moe_config();
  torch::manual_seed(3);
  std::vector<data::Batch> batches;
  for (int i = 0; i < 3; ++i) {
    const Tensor stream = torch::randint(model_config.vocab_size, {2, 9});
    batches.push_back({stream.narrow(1, 0, 8).contiguous(), stream.narrow(1, 1, 8).contiguous(),
                       model::default_position_ids(2, 8)});
  }
  PipelineStepOptions options;
  options.micro_batches = 3;
  options.loss_scale = 1.0 / 3;
  const auto gradients = [&](model::TransformerImpl& model, parallel::ParallelContext& context) {
    size_t next = 0;
    const PipelineStepResult step = run_pipeline_step(model, context, options, [&] { return batches[next++]; });
    DistributedOptimizer(model, config::TrainConfig{}, context, /*shard=*/false, parallel::expert_weights(model))
        .reduce_gradients();
    std::map<std::string, Tensor> out;
    for (const auto& p : model.named_parameters()) out[p.key()] = p.value().grad().clone();
    return std::make_pair(out, step);
  };

  model::Transformer whole(model_config, moe_config);
  model::init_weights(*whole, model_config, 7);
  parallel::ParallelContext single_process;
  const auto [expected, whole_step] = gradients(*whole, single_process);

  std::vector<std::map<std::string, Tensor>> per_stage(2);
  std::vector<PipelineStepResult> stage_steps(2);
  on_ranks(2, 2, [&](parallel::ParallelContext& context) {
    const int64_t s = context.layout().stage;
    model::Transformer stage(model_config, moe_config, model::balanced_stage(model_config.num_layers, 2, s));
    model::init_weights(*stage, model_config, 7);
    std::tie(per_stage[static_cast<size_t>(s)], stage_steps[static_cast<size_t>(s)]) = gradients(*stage, context);
  });
  for (const auto& stage : per_stage) {
    for (const auto& [name, grad] : stage) {
      ASSERT_TRUE(expected.count(name)) << name;
      EXPECT_LT(testing::max_abs_diff(grad, expected.at(name)), 1e-6) << name;
    }
  }
  EXPECT_EQ(per_stage[0].size() + per_stage[1].size() - 1, expected.size());  // the tied embedding twice
  // The losses live on the last stage.
  EXPECT_NEAR(stage_steps[1].lm_loss_sum.item<double>(), whole_step.lm_loss_sum.item<double>(), 1e-6);
  EXPECT_EQ(stage_steps[0].lm_loss_sum.item<double>(), 0.0);
}

// One optimizer step at dp = 2, each rank on its own tokens: in every scope the bias ends the
// same on both ranks, and is the scope's rule (docs/routers.md) applied to both ranks' statistics
// together.
TEST(OptimizerStepBalanceTest, TheBiasStepUsesEveryRanksStatisticsInEveryScope) {
  for (const config::BalanceScope scope :
       {config::BalanceScope::kMicroBatch, config::BalanceScope::kSequence, config::BalanceScope::kGlobalBatch}) {
    config::RunConfig run;
    run.model = testing::small_model_config();
    run.moe = testing::small_moe_config(config::RouterKind::kLinear);
    run.moe.aux_loss_coeff = 0.01;
    run.moe.bias_balancing_rate = 1e-2;
    run.moe.balance_scope = scope;
    run.train.seq_length = 8;
    run.train.micro_batch_size = 2;
    run.train.global_batch_size = 8;  // 2 micro-batches per rank
    std::vector<Tensor> biases(2), statistics(2);
    on_ranks(2, 1, [&](parallel::ParallelContext& context) {
      const int64_t r = context.layout().dp_rank;
      model::Transformer model(run.model, run.moe);
      model::init_weights(*model, run.model, 3);
      parallel::apply_balance_reducer(*model, context);
      DistributedOptimizer optimizer(*model, run.train, context, /*shard=*/false, parallel::expert_weights(*model));
      OptimizerStep step(run, *model, optimizer, context);
      at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(10 + r);  // the ranks are threads
      StepResult result = step.forward_backward(0, [&] {
        const Tensor stream = torch::randint(run.model.vocab_size, {2, 9}, generator);
        return data::Batch{stream.narrow(1, 0, 8).contiguous(), stream.narrow(1, 1, 8).contiguous(),
                           model::default_position_ids(2, 8)};
      });
      statistics[static_cast<size_t>(r)] = model->moe_layers().front()->gate->step_bias_statistics().clone();
      step.apply(0, result);
      biases[static_cast<size_t>(r)] =
          dynamic_cast<model::TopKRouterImpl&>(*model->moe_layers().front()->gate).expert_bias.clone();
    });
    const std::string name = config::to_string(scope);
    EXPECT_TRUE(torch::equal(biases[0], biases[1])) << name;
    const Tensor both = statistics[0] + statistics[1];
    const Tensor want = scope == config::BalanceScope::kSequence
                            ? model::sequence_expert_bias_delta(both, 1e-2)
                            : model::expert_bias_delta(both.narrow(0, 0, run.moe.num_experts), 1e-2);
    EXPECT_TRUE(torch::equal(biases[0], want)) << name << biases[0] << want;
    EXPECT_GT(want.abs().max().item<double>(), 0.0) << name;
    EXPECT_FALSE(torch::equal(statistics[0], statistics[1])) << name << ": the ranks saw different tokens";
  }
}

}  // namespace
}  // namespace yuanmoe::train
