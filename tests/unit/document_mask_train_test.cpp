// data.reset_attention_mask from the data to the step (docs/data.md): the document-id rule against
// the position-id rule, the sampler's batches with and without it, the TokenLayout the train and
// eval paths build, the config rule, the pipeline executor over two stages against one process,
// and a short training run with the mask and recompute on.
#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "support/temp_dir.h"
#include "support/tiny_run.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/pipeline.h"
#include "yuanmoe/train/token_layout.h"
#include "yuanmoe/train/trainer.h"

namespace yuanmoe::train {
namespace {

using testing::TempDir;
constexpr int64_t kEod = testing::kTinyEod;

TEST(DocumentIds, StartANewDocumentOnTheTokenAfterEachEod) {
  const Tensor tokens = torch::tensor({5, 0, 3, 0, 0, 7, 8, 0, 4, 4, 4, 4}, torch::kLong).view({2, 6});
  const Tensor expected = torch::tensor({0, 0, 1, 1, 2, 3, 0, 0, 1, 1, 1, 1}, torch::kLong).view({2, 6});
  const Tensor documents = data::document_ids(tokens, kEod);
  EXPECT_TRUE(torch::equal(documents, expected)) << documents;
  // The same boundaries as reset_position_ids: a new document exactly where positions restart.
  const Tensor positions = data::reset_position_ids(tokens, kEod);
  const Tensor starts = documents.narrow(1, 1, 5) != documents.narrow(1, 0, 5);
  EXPECT_TRUE(torch::equal(starts, positions.narrow(1, 1, 5) == 0));
}

data::SamplerOptions sampler_options_for(bool reset_attention_mask) {
  data::SamplerOptions o;
  o.seq_length = 32;
  o.micro_batch_size = 2;
  o.reset_position_ids = true;
  o.reset_attention_mask = reset_attention_mask;
  o.eod_id = kEod;
  return o;
}

TEST(DocumentIds, SamplerCarriesThemOnlyWithResetAttentionMask) {
  TempDir dir;
  testing::write_counting_corpus(dir / "train", 20, 97, 1);
  auto dataset = std::make_shared<const data::IndexedDataset>(dir / "train");
  data::GptSampler on(dataset, sampler_options_for(true)), off(dataset, sampler_options_for(false));
  bool saw_two_documents = false;
  for (int i = 0; i < 3; ++i) {
    const data::Batch a = on.next_batch(), b = off.next_batch();
    ASSERT_TRUE(a.document_ids.defined());
    EXPECT_TRUE(torch::equal(a.document_ids, data::document_ids(a.tokens, kEod)));
    EXPECT_TRUE(torch::equal(a.tokens, b.tokens));  // the same batches otherwise
    EXPECT_TRUE(torch::equal(a.position_ids, b.position_ids));
    EXPECT_FALSE(b.document_ids.defined());
    saw_two_documents |= a.document_ids.max().item<int64_t>() > 0;
  }
  EXPECT_TRUE(saw_two_documents);  // documents of 11..41 tokens in samples of 32
  data::SamplerOptions no_eod = sampler_options_for(true);
  no_eod.reset_position_ids = false;
  no_eod.eod_id = -1;
  EXPECT_THROW(data::GptSampler(dataset, no_eod), std::invalid_argument);
}

TEST(TokenLayout, FromTheBatch) {
  const Tensor tokens = torch::tensor({5, 0, 3, 4}, torch::kLong).view({1, 4});
  data::Batch batch{tokens, torch::tensor({0, 3, 4, 9}, torch::kLong).view({1, 4}), data::reset_position_ids(tokens, kEod)};
  model::TokenLayout layout = token_layout(batch, torch::kCPU);
  EXPECT_TRUE(torch::equal(layout.position_ids_BS, batch.position_ids));
  EXPECT_FALSE(layout.document_ids_BS.defined());  // off: plain causal
  batch.document_ids = data::document_ids(tokens, kEod);
  layout = token_layout(batch, torch::kCPU);
  EXPECT_TRUE(torch::equal(layout.document_ids_BS, batch.document_ids));
  // One document in every row: the causal layout, without ids (the same mask, the faster kernel).
  const Tensor one_document = torch::tensor({5, 7, 3, 4}, torch::kLong).view({1, 4});
  const data::Batch whole{one_document, one_document, data::reset_position_ids(one_document, kEod),
                          data::document_ids(one_document, kEod)};
  EXPECT_FALSE(token_layout(whole, torch::kCPU).document_ids_BS.defined());
}

TEST(ResetAttentionMaskConfig, DefaultsOffAndNeedsResetPositionIds) {
  nlohmann::json root = nlohmann::json::parse(R"({
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
              "rotary_dim": 16, "vocab_size": 256, "max_seq_length": 64},
    "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 96},
    "train": {"seq_length": 64, "max_steps": 10}
  })");
  EXPECT_FALSE(config::parse_config(root).config.data.reset_attention_mask);
  root["data"]["reset_attention_mask"] = true;
  config::ParseResult parsed = config::parse_config(root);
  ASSERT_TRUE(parsed.issues.empty());
  EXPECT_TRUE(parsed.config.data.reset_attention_mask);
  EXPECT_TRUE(config::validate(parsed.config).empty());
  root["data"]["reset_position_ids"] = false;
  const auto issues = config::validate(config::parse_config(root).config);
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].path, "data.reset_attention_mask");
  EXPECT_NE(issues[0].message.find("needs data.reset_position_ids = true"), std::string::npos) << issues[0].message;
}

// Off: the batch carries no document ids, and the model's logits on the layout built from it are
// bit for bit those of the positions-only forward; on the same packed batch the mask changes them.
TEST(ResetAttentionMaskOff, TheModelRunsThePlainCausalPath) {
  TempDir dir;
  testing::write_counting_corpus(dir / "train", 20, 97, 1);
  auto dataset = std::make_shared<const data::IndexedDataset>(dir / "train");
  const data::Batch off = data::GptSampler(dataset, sampler_options_for(false)).next_batch();
  const data::Batch on = data::GptSampler(dataset, sampler_options_for(true)).next_batch();
  torch::manual_seed(0);
  const auto model_config = testing::small_model_config();
  model::Transformer model(model_config, testing::small_moe_config());
  model::init_weights(*model, model_config, 1);
  model->eval();
  const Tensor plain = model(off.tokens, off.position_ids).out;
  EXPECT_TRUE(torch::equal(model(off.tokens, token_layout(off, torch::kCPU)).out, plain));
  EXPECT_GT(testing::max_abs_diff(model(on.tokens, token_layout(on, torch::kCPU)).out, plain), 1e-4);
}

// run_pipeline_step over two stages (two ranks as threads): every stage builds the layout from its
// own copy of the micro-batches, so the gradients equal one process's with the mask, and differ
// from the unmasked ones.
TEST(ResetAttentionMaskPipeline, TwoStagesGiveTheOneProcessGradients) {
  const config::ModelConfig model_config = testing::small_model_config();
  const config::MoeConfig moe_config = testing::small_moe_config();
  torch::manual_seed(3);
  std::vector<data::Batch> batches;
  for (int i = 0; i < 2; ++i) {
    Tensor stream = torch::randint(1, model_config.vocab_size, {2, 13});
    stream[0][3] = kEod;  // row 0: documents of 4, 4 and 4 tokens; row 1: 6 and 6
    stream[0][7] = kEod;
    stream[1][5] = kEod;
    const Tensor tokens = stream.narrow(1, 0, 12).contiguous();
    batches.push_back({tokens, stream.narrow(1, 1, 12).contiguous(), data::reset_position_ids(tokens, kEod),
                       data::document_ids(tokens, kEod)});
  }
  PipelineStepOptions options;
  options.lm_loss_scales = {0.5, 0.5};
  options.aux_loss_scale = 0.5;
  const auto gradients = [&](model::TransformerImpl& model, parallel::ParallelContext& context,
                             const std::vector<data::Batch>& micro_batches) {
    run_pipeline_step(model, context, options, micro_batches);
    DistributedOptimizer(model, config::TrainConfig{}, context, /*shard=*/false, parallel::expert_weights(model))
        .reduce_gradients();
    std::map<std::string, Tensor> out;
    for (const auto& p : model.named_parameters()) out[p.key()] = p.value().grad().clone();
    return out;
  };
  model::Transformer whole(model_config, moe_config);
  model::init_weights(*whole, model_config, 7);
  parallel::ParallelContext single_process;
  const auto expected = gradients(*whole, single_process, batches);
  std::vector<data::Batch> unmasked = batches;
  for (auto& b : unmasked) b.document_ids = Tensor();
  whole->zero_grad(true);
  const auto expected_unmasked = gradients(*whole, single_process, unmasked);

  std::vector<std::map<std::string, Tensor>> per_stage(2);
  testing::on_ranks(2, 2, [&](parallel::ParallelContext& context) {
    const int64_t s = context.layout().stage;
    model::Transformer stage(model_config, moe_config, model::balanced_stage(model_config.num_layers, 2, s));
    model::init_weights(*stage, model_config, 7);
    per_stage[static_cast<size_t>(s)] = gradients(*stage, context, batches);
  });
  double worst = 0, unmasked_diff = 0;
  for (const auto& stage : per_stage) {
    for (const auto& [name, grad] : stage) {
      ASSERT_TRUE(expected.count(name)) << name;
      worst = std::max(worst, testing::max_abs_diff(grad, expected.at(name)));
      unmasked_diff = std::max(unmasked_diff, testing::max_abs_diff(grad, expected_unmasked.at(name)));
    }
  }
  EXPECT_LT(worst, 1e-6);
  EXPECT_GT(unmasked_diff, 1e-4);
}

// The trainer end to end with data.reset_attention_mask and recompute: finite, falling losses
// and an evaluation.
TEST(ResetAttentionMaskTrainer, TrainsAndEvaluates) {
  TempDir data_dir, run_dir;
  testing::write_tiny_corpora(data_dir.path().string(), 97);
  config::RunConfig run = testing::tiny_run_config(data_dir.path().string());
  run.data.reset_attention_mask = true;
  run.train.recompute = true;
  run.train.max_steps = 12;
  ASSERT_TRUE(config::validate(run).empty());
  Trainer trainer(run, {run_dir.path()});
  const TrainSummary summary = trainer.run();
  EXPECT_EQ(summary.last_step, 12);
  ASSERT_TRUE(summary.first_eval && summary.last_eval);
  EXPECT_TRUE(std::isfinite(summary.last_eval->loss));
  EXPECT_LT(summary.last_eval->loss, summary.first_eval->loss);
}

}  // namespace
}  // namespace yuanmoe::train
