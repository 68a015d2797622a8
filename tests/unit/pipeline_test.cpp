// run_pipeline_step over two stages (real Gloo process groups, two ranks as two threads of this
// process: the same c10d code as two processes) against the one-process gradients and losses.
#include <map>

#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/pipeline.h"

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
  options.lm_loss_scales = {1.0 / 3, 1.0 / 3, 1.0 / 3};
  options.aux_loss_scale = 1.0 / 3;
  const auto gradients = [&](model::TransformerImpl& model, parallel::ParallelContext& context) {
    const PipelineStepResult step = run_pipeline_step(model, context, options, batches);
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
  EXPECT_LT(testing::max_abs_diff(stage_steps[1].lm_losses_M, whole_step.lm_losses_M), 1e-6);
  EXPECT_EQ(stage_steps[0].lm_losses_M.abs().sum().item<double>(), 0.0);
}

}  // namespace
}  // namespace yuanmoe::train
