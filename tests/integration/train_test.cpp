// The training loop and what it relies on: LR schedule values, recompute = same gradients,
// a tiny run that learns, bit-exact resume, fine-tuning at a longer context, bad checkpoints.
#include <fstream>

#include "support/fixtures.h"
#include "support/temp_dir.h"
#include "support/tiny_run.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/recompute.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/train/checkpointer.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/lr_schedule.h"
#include "yuanmoe/train/plots.h"
#include "yuanmoe/train/trainer.h"

namespace yuanmoe::train {
namespace {

namespace fs = std::filesystem;
using config::RouterKind;
using testing::TempDir;

TEST(LrSchedule, WarmupThenCosineLinearOrConstant) {
  config::TrainConfig t;
  t.lr = 1.0;
  t.min_lr = 0.1;
  t.warmup_steps = 10;
  t.max_steps = 110;
  EXPECT_DOUBLE_EQ(lr_at(0, t), 0.1);   // (0 + 1) / 10
  EXPECT_DOUBLE_EQ(lr_at(4, t), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(9, t), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(10, t), 1.0);  // decay starts at the peak
  EXPECT_NEAR(lr_at(60, t), 0.55, 1e-12);   // halfway: min + (max - min) / 2
  EXPECT_NEAR(lr_at(35, t), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-12);
  EXPECT_DOUBLE_EQ(lr_at(110, t), 0.1);
  EXPECT_DOUBLE_EQ(lr_at(500, t), 0.1);  // past max_steps: stays at min_lr
  t.lr_schedule = config::LrSchedule::kLinear;
  EXPECT_NEAR(lr_at(35, t), 1.0 - 0.9 * 0.25, 1e-12);
  EXPECT_DOUBLE_EQ(lr_at(110, t), 0.1);
  t.lr_schedule = config::LrSchedule::kConstant;
  EXPECT_DOUBLE_EQ(lr_at(35, t), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(5, t), 0.6);  // warmup applies to every schedule
  t.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(lr_at(0, t), 1.0);
}

class RecomputeTest : public testing::SeededTestWithParam<RouterKind> {};

TEST_P(RecomputeTest, GradientsEqualThoseWithoutRecompute) {
  auto model_config = testing::small_model_config();
  auto moe_config = testing::small_moe_config(GetParam());
  moe_config.aux_loss_coeff = 0.01;
  moe_config.z_loss_coeff = 0.001;
  model::Transformer model(model_config, moe_config);
  model::init_weights(*model, model_config);
  model->to(torch::kDouble);
  model->train();
  const auto ids = torch::randint(97, {2, 7});
  const auto pos = model::default_position_ids(2, 7);
  const auto gradients = [&](bool recompute) {
    model::apply_recompute(*model, recompute);
    model->zero_grad(true);
    const model::ModelOutput out = model(ids, pos);
    Tensor loss = out.out.pow(2).mean();
    if (out.aux_loss.defined()) loss = loss + out.aux_loss;
    loss.backward();
    std::vector<Tensor> grads;
    for (const auto& p : model->parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : Tensor());
    return std::make_pair(grads, out.routed_pairs_LE);
  };
  const auto [plain, load_plain] = gradients(false);
  const auto [recomputed, load_recomputed] = gradients(true);
  ASSERT_EQ(plain.size(), recomputed.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    ASSERT_EQ(plain[i].defined(), recomputed[i].defined()) << i;
    if (plain[i].defined()) EXPECT_LT(testing::max_abs_diff(plain[i], recomputed[i]), 1e-12) << i;
  }
  EXPECT_TRUE(torch::equal(load_plain, load_recomputed));  // counted once, not once per run
}

INSTANTIATE_TEST_SUITE_P(AllRouters, RecomputeTest, ::testing::ValuesIn(testing::all_router_kinds()));

// With dropout the rerun in backward must draw the same masks as the first run: the generator is
// reset to the state before the first run. Drawn from the same seed, plain and recomputed steps
// then give equal gradients; with the masks of another draw they would not.
TEST(RecomputeDropoutTest, RerunDrawsTheFirstRunsDropoutMasks) {
  auto model_config = testing::small_model_config();
  model_config.attention_dropout = 0.5;
  model::Transformer model(model_config, testing::small_moe_config(RouterKind::kAttention));
  model::init_weights(*model, model_config);
  model->to(torch::kDouble);
  model->train();
  const auto ids = torch::randint(97, {2, 7});
  const auto pos = model::default_position_ids(2, 7);
  const auto gradient = [&](bool recompute, uint64_t seed) {
    model::apply_recompute(*model, recompute);
    model->zero_grad(true);
    torch::manual_seed(seed);
    model(ids, pos).out.pow(2).mean().backward();
    return model->blocks.front()->self_attn->q_proj->weight.grad().clone();
  };
  const Tensor plain = gradient(false, 11);
  EXPECT_LT(testing::max_abs_diff(gradient(true, 11), plain), 1e-12);
  EXPECT_GT(testing::max_abs_diff(gradient(false, 12), plain), 1e-6);  // the masks matter
}

/// Train losses by step from a run dir's metrics.jsonl.
std::map<int64_t, double> train_losses(const fs::path& run_dir) {
  std::map<int64_t, double> losses;
  std::ifstream in(run_dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("split")) {
      losses[j["step"].get<int64_t>()] =
          j["loss"].is_number() ? j["loss"].get<double>() : std::numeric_limits<double>::quiet_NaN();
    }
  }
  return losses;
}

TEST(Plots, DrawsLossAndLoadFromMetricsOrSaysWhyNot) {
  TempDir run;
  {
    std::ofstream metrics(run.path() / "metrics.jsonl");
    metrics << R"({"step":0,"split":"valid","loss":5.0})" << "\n"
            << R"({"step":1,"loss":4.5,"expert_load":[[0.25,0.75],[0.5,0.5]]})" << "\n"
            << R"({"step":2,"loss":4.0,"expert_load":[[0.5,0.5],[0.4,0.6]]})" << "\n"
            << R"({"step":2,"split":"valid","loss":4.2})" << "\n";
  }
  const char* path = std::getenv("PATH");
  const std::string saved_path = path ? path : "";
  ::setenv("PATH", "/nonexistent", 1);
  const std::string without = render_plots(run.path());
  ::setenv("PATH", saved_path.c_str(), 1);
  EXPECT_NE(without.find("gnuplot not found"), std::string::npos) << without;
  EXPECT_FALSE(fs::exists(run.path() / "plots" / "loss.png"));

  const std::string problem = render_plots(run.path());  // scripts/setup.sh installs gnuplot
  ASSERT_EQ(problem, "");
  EXPECT_GT(fs::file_size(run.path() / "plots" / "loss.png"), 1000u);
  EXPECT_GT(fs::file_size(run.path() / "plots" / "expert_load.png"), 1000u);
  std::ifstream load(run.path() / "plots" / "expert_load.dat");
  std::string first_row;
  std::getline(load, first_row);
  EXPECT_EQ(first_row, "0.5 0.5 ");  // the latest train line's layer 0
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override { testing::write_tiny_corpora(data_.path().string(), 97); }
  config::RunConfig config(RouterKind router = RouterKind::kAttention) {
    return testing::tiny_run_config(data_.path().string(), router);
  }
  TempDir data_;
};

TEST_F(TrainerTest, ThirtyStepsLowerTheLoss) {
  TempDir run_dir;
  config::RunConfig run = config();
  run.train.max_steps = 30;
  run.train.eval_interval = 15;
  Trainer trainer(run, {run_dir.path()});
  const TrainSummary summary = trainer.run();
  const auto losses = train_losses(run_dir.path());
  ASSERT_EQ(losses.size(), 30u);
  EXPECT_LT(losses.at(30), losses.at(1) - 1.0) << "first " << losses.at(1) << " last " << losses.at(30);
  ASSERT_TRUE(summary.first_eval && summary.last_eval);
  EXPECT_LT(summary.last_eval->loss, summary.first_eval->loss - 1.0);
  EXPECT_TRUE(fs::exists(run_dir.path() / "checkpoints" / "step_00000030" / "manifest.json"));
  EXPECT_TRUE(fs::exists(run_dir.path() / "config.resolved.json"));
  EXPECT_TRUE(fs::exists(run_dir.path() / "train.log"));
}

TEST_F(TrainerTest, MetricsLinesCarryTheSpecFields) {
  TempDir run_dir;
  config::RunConfig run = config();
  run.train.max_steps = 2;
  Trainer(run, {run_dir.path()}).run();
  std::ifstream in(run_dir.path() / "metrics.jsonl");
  std::string line;
  int train_lines = 0, valid_lines = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("split", "") == "valid") {
      ++valid_lines;
      EXPECT_TRUE(j.contains("perplexity"));
      // Per MoE layer: top-2 routes exactly 2 pairs per token; the entropy is within [0, ln E].
      ASSERT_EQ(j["active_experts"].size(), 2u);
      ASSERT_EQ(j["router_entropy"].size(), 2u);
      for (int l = 0; l < 2; ++l) {
        EXPECT_EQ(j["active_experts"][l].get<double>(), static_cast<double>(run.moe.top_k));
        EXPECT_GT(j["router_entropy"][l].get<double>(), 0.0);
        EXPECT_LE(j["router_entropy"][l].get<double>(), std::log(static_cast<double>(run.moe.num_experts)) + 1e-4);
      }
      continue;
    }
    ++train_lines;
    for (const char* key : {"step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "mfu",
                            "expert_load"}) {
      EXPECT_TRUE(j.contains(key)) << key;
    }
    ASSERT_EQ(j["expert_load"].size(), 2u);  // MoE layers
    double share = 0;
    for (const auto& x : j["expert_load"][0]) share += x.get<double>();
    EXPECT_NEAR(share, 1.0, 1e-3);
    EXPECT_EQ(j["tokens_seen"].get<int64_t>(), j["step"].get<int64_t>() * 4 * 16);
  }
  EXPECT_EQ(train_lines, 2);
  EXPECT_EQ(valid_lines, 2);  // the baseline at step 0 and the final one
}

/// Every tensor of two checkpoints' model, optimizer and buffers, by name.
void expect_same_state(const fs::path& a_dir, const fs::path& b_dir) {
  const auto a = checkpoint::load_checkpoint(a_dir), b = checkpoint::load_checkpoint(b_dir);
  for (const auto& [xs, ys] : {std::make_pair(&a.model, &b.model), std::make_pair(&a.optimizer, &b.optimizer)}) {
    ASSERT_EQ(xs->size(), ys->size());
    for (size_t i = 0; i < xs->size(); ++i) {
      EXPECT_EQ((*xs)[i].first, (*ys)[i].first);
      EXPECT_TRUE(torch::equal((*xs)[i].second, (*ys)[i].second)) << (*xs)[i].first;
    }
  }
}

class ResumeTest : public TrainerTest, public ::testing::WithParamInterface<RouterKind> {};

TEST_P(ResumeTest, StoppedAndResumedRunIsBitIdentical) {
  config::RunConfig run = config(GetParam());
  run.moe.aux_loss_coeff = 0.01;
  if (GetParam() == RouterKind::kAttention || GetParam() == RouterKind::kLinear) run.moe.bias_balancing_rate = 1e-3;
  run.model.attention_dropout = 0.1;  // the RNG state has to resume too
  run.train.max_steps = 8;
  run.checkpoint.interval = 3;
  TempDir straight, resumed;
  Trainer(run, {straight.path()}).run();

  Trainer(run, {resumed.path(), /*exit_after_steps=*/5}).run();  // checkpoints at 3 and 5
  // As if killed during step 5's checkpoint: only step 3 is complete, metrics run ahead to 5.
  fs::remove_all(resumed.path() / "checkpoints" / "step_00000005");
  Trainer second(run, {resumed.path()});
  EXPECT_EQ(second.step(), 3);
  second.run();

  const auto expected = train_losses(straight.path()), actual = train_losses(resumed.path());
  ASSERT_EQ(expected.size(), 8u);
  ASSERT_EQ(actual.size(), 8u);
  for (const auto& [step, loss] : expected) EXPECT_EQ(actual.at(step), loss) << "step " << step;  // bit-exact

  expect_same_state(straight.path() / "checkpoints" / "step_00000008", resumed.path() / "checkpoints" / "step_00000008");
}

INSTANTIATE_TEST_SUITE_P(AllRouters, ResumeTest, ::testing::ValuesIn(testing::all_router_kinds()));

TEST_F(TrainerTest, FineTunesAtFourTimesTheContextFromACheckpoint) {
  TempDir base_dir, tuned_dir;
  config::RunConfig base = config();
  base.train.max_steps = 4;
  Trainer(base, {base_dir.path()}).run();

  config::RunConfig tuned = base;  // 16 -> 64 tokens, base scaled by the NTK-aware rule
  tuned.train.seq_length = 64;
  tuned.model.max_seq_length = 64;
  tuned.model.rope_base = model::ntk_scaled_rope_base(base.model.rope_base, 4.0, base.model.rotary_dim);
  tuned.train.recompute = true;
  tuned.train.lr_schedule = config::LrSchedule::kConstant;
  tuned.train.warmup_steps = 0;
  tuned.train.micro_batch_size = 1;
  tuned.train.global_batch_size = 2;
  tuned.train.max_steps = 3;
  tuned.train.init_from = base_dir.path().string();
  Trainer trainer(tuned, {tuned_dir.path()});
  EXPECT_EQ(trainer.step(), 0);  // fresh schedule
  const auto saved = checkpoint::load_checkpoint(base_dir.path() / "checkpoints" / "step_00000004");
  const auto params = trainer.model()->named_parameters();
  for (const auto& [name, t] : saved.model) {
    if (params.contains(name)) EXPECT_TRUE(torch::equal(params[name].cpu(), t.cpu())) << name;
  }
  const TrainSummary summary = trainer.run();
  EXPECT_EQ(summary.last_step, 3);
  EXPECT_TRUE(std::isfinite(summary.last_loss));
  const auto manifest = checkpoint::read_manifest(tuned_dir.path() / "checkpoints" / "step_00000003");
  EXPECT_EQ(manifest["config"]["train"]["seq_length"], 64);
  EXPECT_EQ(manifest["tokens_seen"], 3 * 2 * 64);
}

TEST_F(TrainerTest, RefusesToResumeAnotherArchitecture) {
  TempDir run_dir;
  config::RunConfig run = config();
  run.train.max_steps = 1;
  Trainer(run, {run_dir.path()}).run();
  run.moe.num_experts = 4;
  try {
    Trainer(run, {run_dir.path()});
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("moe.num_experts is 8 in the checkpoint, 4 in the config"), std::string::npos)
        << e.what();
  }
}

TEST_F(TrainerTest, Bf16AutocastTrains) {
  TempDir fp32_dir, bf16_dir;
  config::RunConfig run = config();
  run.train.max_steps = 3;
  Trainer(run, {fp32_dir.path()}).run();
  run.train.precision = config::Precision::kBf16;
  const TrainSummary summary = Trainer(run, {bf16_dir.path()}).run();
  EXPECT_TRUE(std::isfinite(summary.last_loss));
  const auto fp32 = train_losses(fp32_dir.path()), bf16 = train_losses(bf16_dir.path());
  EXPECT_NE(fp32.at(1), bf16.at(1));                 // autocast really ran in bf16
  for (int64_t step = 1; step <= 3; ++step) {        // ... and trains the same model: every step's
    EXPECT_NEAR(fp32.at(step), bf16.at(step), 0.05) << "step " << step;  // loss within 0.05 nats
  }
  // Weights and optimizer state stay fp32.
  const auto saved = checkpoint::load_checkpoint(bf16_dir.path() / "checkpoints" / "step_00000003");
  for (const auto& [name, t] : saved.model) {
    if (t.is_floating_point()) EXPECT_EQ(t.scalar_type(), torch::kFloat) << name;
  }
}

/// The message of the runtime_error that stops `run`; a test failure (and "") if it finishes.
std::string stop_message(const config::RunConfig& run, const TrainerOptions& options) {
  try {
    Trainer(run, options).run();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected the run to stop";
  return "";
}

TEST_F(TrainerTest, TokensBeyondTheVocabularyAreNamed) {
  TempDir run_dir;
  config::RunConfig run = config();
  run.model.vocab_size = 40;  // the corpus counts up to 96
  const std::string message = stop_message(run, {run_dir.path()});
  // The baseline evaluation reads the validation set first.
  EXPECT_NE(message.find(run.data.valid_prefix + ": token id 4"), std::string::npos) << message;
  EXPECT_NE(message.find("outside the model's vocabulary [0, 40)"), std::string::npos) << message;
}

TEST_F(TrainerTest, MissingDatasetIsNamed) {
  TempDir run_dir;
  config::RunConfig run = config();
  run.data.train_prefix = (run_dir.path() / "nope").string();
  try {
    Trainer(run, {run_dir.path()});
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos) << e.what();
  }
}

// train.on_nonfinite = stop: the run ends naming the step, the newest checkpoint is the one before
// it, and rerunning (the fault gone) resumes and ends exactly where an unharmed run ends.
TEST_F(TrainerTest, NonfiniteStepStopsAndTheRunResumesExactly) {
  config::RunConfig run = config();
  run.train.max_steps = 8;
  run.checkpoint.interval = 4;
  TempDir straight, poisoned;
  Trainer(run, {straight.path()}).run();
  TrainerOptions faulty{poisoned.path()};
  faulty.nonfinite_steps = {6};
  const std::string stopped = stop_message(run, faulty);
  EXPECT_NE(stopped.find("step 6: loss"), std::string::npos) << stopped;
  EXPECT_NE(stopped.find("nothing of this step was applied"), std::string::npos) << stopped;
  EXPECT_EQ(checkpoint::find_latest_checkpoint(poisoned.path() / "checkpoints"),
            poisoned.path() / "checkpoints" / "step_00000004");
  EXPECT_EQ(train_losses(poisoned.path()).size(), 5u);
  Trainer resumed(run, {poisoned.path()});
  EXPECT_EQ(resumed.step(), 4);
  resumed.run();
  const auto expected = train_losses(straight.path()), actual = train_losses(poisoned.path());
  ASSERT_EQ(actual.size(), 8u);
  for (const auto& [step, loss] : expected) EXPECT_EQ(actual.at(step), loss) << "step " << step;
  expect_same_state(straight.path() / "checkpoints" / "step_00000008", poisoned.path() / "checkpoints" / "step_00000008");
}

// train.on_nonfinite = skip: poisoned steps consume their batch and change nothing: weights,
// AdamW moments and the routers' balancing bias after steps 3-4 equal those after step 2.
TEST_F(TrainerTest, SkippedNonfiniteStepsApplyNothing) {
  config::RunConfig run = config();
  run.moe.aux_loss_coeff = 0.01;
  run.moe.bias_balancing_rate = 1e-3;
  run.train.on_nonfinite = config::NonfinitePolicy::kSkip;
  run.train.max_steps = 6;
  TempDir before, skipping;
  Trainer(run, {before.path(), /*exit_after_steps=*/2}).run();
  TrainerOptions faulty{skipping.path(), /*exit_after_steps=*/4};
  faulty.nonfinite_steps = {3, 4};
  Trainer(run, faulty).run();
  expect_same_state(before.path() / "checkpoints" / "step_00000002", skipping.path() / "checkpoints" / "step_00000004");
  const auto losses = train_losses(skipping.path());
  ASSERT_EQ(losses.size(), 4u);
  EXPECT_TRUE(std::isfinite(losses.at(3)));  // the loss was finite, the gradients were not
  std::ifstream in(skipping.path() / "metrics.jsonl");
  std::string line;
  int skipped = 0;
  while (std::getline(in, line)) skipped += nlohmann::json::parse(line).value("skipped", false) ? 1 : 0;
  EXPECT_EQ(skipped, 2);
  Trainer(run, {skipping.path()}).run();  // and the run carries on to the end
  EXPECT_EQ(train_losses(skipping.path()).size(), 6u);
}

TEST_F(TrainerTest, TooManyConsecutiveSkipsStop) {
  config::RunConfig run = config();
  run.train.on_nonfinite = config::NonfinitePolicy::kSkip;
  run.train.max_consecutive_skips = 2;
  TempDir run_dir;
  TrainerOptions faulty{run_dir.path()};
  faulty.nonfinite_steps = {2, 4, 5, 6};  // 2 alone is tolerated; 4, 5, 6 are three in a row
  const std::string stopped = stop_message(run, faulty);
  EXPECT_NE(stopped.find("step 6:"), std::string::npos) << stopped;
  EXPECT_NE(stopped.find("train.max_consecutive_skips = 2"), std::string::npos) << stopped;
}

// Checkpoints written by one process before the sharded layout became the only one (single
// model / optimizer / rng files, the generator under "cpu") resume: weights, AdamW state and
// the random stream; a save then writes the one layout.
TEST(CheckpointManagerTest, ResumesTheSingleFilesOfEarlierVersionsAndSavesTheShardedLayout) {
  TempDir dir;
  const fs::path checkpoints = dir.path() / "checkpoints";
  config::RunConfig run = testing::tiny_run_config(dir.path().string());
  model::Transformer model(run.model, run.moe);
  model::init_weights(*model, run.model, 1);
  parallel::ParallelContext single_process;
  DistributedOptimizer optimizer(*model, run.train, single_process, /*shard=*/false, parallel::expert_weights(*model));
  model(torch::randint(run.model.vocab_size, {2, 8}), model::default_position_ids(2, 8)).out.sum().backward();
  optimizer.step(/*max_norm=*/0.0, 0.0);

  checkpoint::Checkpoint old;
  old.config = run;
  old.progress.step = 3;
  const fs::path tmp = checkpoint::begin_checkpoint(checkpoints, 3);
  checkpoint::write_checkpoint_file(tmp, "model.safetensors", checkpoint::model_state(*model));
  checkpoint::write_checkpoint_file(tmp, "optimizer.safetensors", optimizer.state_by_name());
  torch::manual_seed(42);
  const Tensor rng_state = at::detail::getDefaultCPUGenerator().get_state();
  const Tensor next_draw = torch::rand({4});
  checkpoint::write_checkpoint_file(tmp, "rng.safetensors", {{"cpu", rng_state}});
  checkpoint::finish_checkpoint(checkpoints, tmp, old, 3);

  model::Transformer fresh(run.model, run.moe);
  model::init_weights(*fresh, run.model, 2);
  DistributedOptimizer fresh_optimizer(*fresh, run.train, single_process, /*shard=*/false,
                                       parallel::expert_weights(*fresh));
  const CheckpointManager manager(run, checkpoints, single_process, torch::kCPU);
  torch::manual_seed(7);
  const std::optional<Resumed> resumed = manager.resume(*fresh, fresh_optimizer);
  ASSERT_TRUE(resumed);
  EXPECT_EQ(resumed->progress.step, 3);
  EXPECT_TRUE(resumed->notes.empty());
  EXPECT_TRUE(torch::equal(torch::rand({4}), next_draw));  // the random stream continues
  const auto a = checkpoint::model_state(*model), b = checkpoint::model_state(*fresh);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  const auto sa = optimizer.state_by_name(), sb = fresh_optimizer.state_by_name();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_TRUE(torch::equal(sa[i].second, sb[i].second)) << sa[i].first;

  const fs::path saved = manager.save({4, 0, {}}, *fresh, fresh_optimizer);
  for (const std::string file : {checkpoint::model_file(0), checkpoint::optimizer_file(0), checkpoint::rng_file(0)}) {
    EXPECT_TRUE(fs::exists(saved / file)) << file;
  }
  EXPECT_EQ(checkpoint::load_checkpoint(saved).rng.front().first, "rank0/cpu");
}

}  // namespace
}  // namespace yuanmoe::train
