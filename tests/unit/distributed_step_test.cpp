// The step's collectives on real Gloo process groups, two ranks as two threads of this process
// (the same c10d code as two processes, without the multi-process launch of python.parallel):
// the data-parallel mean and the tied-embedding sum of synchronize_gradients, the global norm
// over pipeline stages, and run_pipeline_step over two stages against the one-process gradients.
#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/gradient_sync.h"
#include "yuanmoe/train/pipeline.h"

namespace yuanmoe::train {
namespace {

using testing::on_ranks;

TEST(GradientSyncTest, DataParallelRanksGetTheMeanGradient) {
  on_ranks(2, 1, [](parallel::ParallelContext& context) {
    const double rank = static_cast<double>(context.world().rank);
    Tensor w = torch::zeros({3, 2}, torch::kDouble).requires_grad_(true);
    Tensor b = torch::zeros({5}).requires_grad_(true);
    w.mutable_grad() = torch::full({3, 2}, 1.0 + rank, torch::kDouble);
    b.mutable_grad() = torch::arange(5, torch::kFloat) * (rank + 1);
    Tensor never = torch::zeros({2}).requires_grad_(true);  // no gradient on either rank
    synchronize_gradients({w, b, never}, Tensor(), context);
    EXPECT_TRUE(torch::allclose(w.grad(), torch::full({3, 2}, 1.5, torch::kDouble)));
    EXPECT_TRUE(torch::allclose(b.grad(), torch::arange(5, torch::kFloat) * 1.5));
    EXPECT_TRUE(torch::equal(never.grad(), torch::zeros({2})));  // zeros, so every rank reduces one list
  });
}

TEST(GradientSyncTest, TiedEmbeddingCopiesSumAndTheNormSpansTheStages) {
  on_ranks(2, 2, [](parallel::ParallelContext& context) {
    const double stage = static_cast<double>(context.layout().stage);
    Tensor embedding = torch::zeros({4, 2}).requires_grad_(true);
    embedding.mutable_grad() = torch::full({4, 2}, stage + 1.0);  // 1 on the first stage, 2 on the last
    synchronize_gradients({embedding}, embedding, context);
    EXPECT_TRUE(torch::equal(embedding.grad(), torch::full({4, 2}, 3.0)));
    // Each stage counts its own parameters: the norm over both is sqrt(8 * 1^2 + 8 * 2^2).
    Tensor own = torch::zeros({4, 2}).requires_grad_(true);
    own.mutable_grad() = torch::full({4, 2}, stage + 1.0);
    EXPECT_NEAR(global_gradient_norm({own}, context), std::sqrt(8.0 + 32.0), 1e-12);
  });
}

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
    synchronize_gradients(model.parameters(), context.embedding.size() > 1 ? model.embed_tokens->weight : Tensor(),
                          context);
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
  EXPECT_NEAR(stage_steps[1].lm_loss_sum, whole_step.lm_loss_sum, 1e-6);      // losses on the last stage
  EXPECT_EQ(stage_steps[0].lm_loss_sum, 0.0);
}

}  // namespace
}  // namespace yuanmoe::train
