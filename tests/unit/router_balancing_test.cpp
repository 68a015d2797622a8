// Router balancing before the optimizer step, over real Gloo process groups (two data-parallel
// ranks as two threads): the expert bias of every moe.balance_scope kept the same on every rank.
#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/balance_reducer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/step.h"

namespace yuanmoe::train {
namespace {

using testing::on_ranks;

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
