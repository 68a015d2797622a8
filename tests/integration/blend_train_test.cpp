// Training on data.blend: an interrupted blended run resumes bit-exactly (losses, per-source
// validation losses, weights, optimizer state, the blend's sampler state), the eval lines carry a
// loss per source, and bad blends stop naming the entry (docs/data.md, "Blends").
#include <fstream>

#include "support/fixtures.h"
#include "support/temp_dir.h"
#include "support/tiny_run.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/train/trainer.h"

namespace yuanmoe::train {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

/// metrics.jsonl: train lines by step, and valid lines by step.
struct Metrics {
  std::map<int64_t, nlohmann::json> train, valid;
};
Metrics read_metrics(const fs::path& run_dir) {
  Metrics out;
  std::ifstream in(run_dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    const int64_t step = j["step"].get<int64_t>();
    if (j.contains("split")) {
      out.valid[step] = j;
    } else {
      j.erase("tokens_per_s");  // timings and the process's memory differ from run to run
      j.erase("mfu");
      j.erase("peak_rss_mib");
      out.train[step] = j;
    }
  }
  return out;
}

class BlendTrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = data_.path().string();
    // Two sources that count by different strides: what the model learns of each shows in its own loss.
    testing::write_counting_corpus(dir + "/web_train", 200, 97, 1, 3);
    testing::write_counting_corpus(dir + "/web_valid", 40, 97, 2, 3);
    testing::write_counting_corpus(dir + "/code_train", 60, 97, 3, 7);
    testing::write_counting_corpus(dir + "/code_valid", 40, 97, 4, 7);
  }
  config::RunConfig config() const {
    const std::string dir = data_.path().string();
    config::RunConfig run = testing::tiny_run_config(dir);
    run.data.train_prefix.clear();
    run.data.valid_prefix.clear();
    run.data.blend = std::vector<config::BlendEntry>{{dir + "/web_train", 0.7, dir + "/web_valid", "web"},
                                                     {dir + "/code_train", 0.3, dir + "/code_valid", ""}};
    return run;
  }
  std::string prefix(const std::string& name) const { return (data_.path() / name).string(); }
  TempDir data_;
};

/// The message of the error that stops building or running the trainer; "" (a failure) if none.
std::string trainer_error(const config::RunConfig& run, const fs::path& run_dir) {
  try {
    Trainer(run, {run_dir}).run();
  } catch (const std::exception& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an error";
  return "";
}

TEST_F(BlendTrainerTest, InterruptedBlendedRunResumesBitExactly) {
  config::RunConfig run = config();
  run.model.attention_dropout = 0.1;  // the RNG state has to resume too
  run.train.max_steps = 8;
  run.train.eval_interval = 4;
  run.checkpoint.interval = 4;
  TempDir straight, resumed;
  Trainer(run, {straight.path()}).run();

  Trainer(run, {resumed.path(), /*exit_after_steps=*/5}).run();  // checkpoints at 4 and 5
  // As if killed during step 5's checkpoint: only step 4 is complete, metrics run ahead to 5.
  fs::remove_all(resumed.path() / "checkpoints" / "step_00000005");
  Trainer second(run, {resumed.path()});
  EXPECT_EQ(second.step(), 4);
  second.run();

  const Metrics expected = read_metrics(straight.path()), actual = read_metrics(resumed.path());
  ASSERT_EQ(expected.train.size(), 8u);
  ASSERT_EQ(actual.train.size(), 8u);
  for (const auto& [step, line] : expected.train) EXPECT_EQ(actual.train.at(step), line) << "step " << step;
  ASSERT_EQ(expected.valid.size(), 3u);  // steps 0, 4, 8
  ASSERT_EQ(actual.valid.size(), 3u);
  for (const auto& [step, line] : expected.valid) EXPECT_EQ(actual.valid.at(step), line) << "eval at step " << step;

  const fs::path a = straight.path() / "checkpoints" / "step_00000008", b = resumed.path() / "checkpoints" / "step_00000008";
  const checkpoint::Checkpoint x = checkpoint::load_checkpoint(a), y = checkpoint::load_checkpoint(b);
  for (const auto& [xs, ys] : {std::make_pair(&x.model, &y.model), std::make_pair(&x.optimizer, &y.optimizer)}) {
    ASSERT_EQ(xs->size(), ys->size());
    for (size_t i = 0; i < xs->size(); ++i) {
      EXPECT_EQ((*xs)[i].first, (*ys)[i].first);
      EXPECT_TRUE(torch::equal((*xs)[i].second, (*ys)[i].second)) << (*xs)[i].first;
    }
  }
  ASSERT_TRUE(x.progress.blend && y.progress.blend);
  EXPECT_EQ(*x.progress.blend, *y.progress.blend);
  // 8 steps of 4 sequences, split 0.7 / 0.3 by Megatron's rule (within one sample).
  EXPECT_EQ(x.progress.blend->samples, 32);
  EXPECT_LE(std::abs(static_cast<double>(x.progress.blend->counts[0]) - 0.7 * 32), 1.0);
  EXPECT_TRUE(checkpoint::read_manifest(a).contains("blend_sampler"));
}

TEST_F(BlendTrainerTest, EvalLinesCarryEachSourcesLoss) {
  config::RunConfig run = config();
  run.train.max_steps = 2;
  TempDir run_dir;
  Trainer(run, {run_dir.path()}).run();
  const Metrics metrics = read_metrics(run_dir.path());
  ASSERT_EQ(metrics.valid.size(), 2u);  // the baseline and the end
  for (const auto& [step, line] : metrics.valid) {
    ASSERT_TRUE(line.contains("sources")) << line.dump();
    const auto& sources = line["sources"];
    ASSERT_EQ(sources.size(), 2u);
    const double web = sources["web"]["loss"].get<double>(), code = sources["code_train"]["loss"].get<double>();
    EXPECT_NE(web, code);
    // Without data.valid_prefix the headline loss is the blend-weighted mean of the sources'.
    EXPECT_NEAR(line["loss"].get<double>(), 0.7 * web + 0.3 * code, 1e-12) << line.dump();
    EXPECT_NEAR(sources["web"]["perplexity"].get<double>(), std::exp(web), 1e-9);
    EXPECT_EQ(line["tokens"].get<int64_t>(),
              sources["web"]["tokens"].get<int64_t>() + sources["code_train"]["tokens"].get<int64_t>());
    EXPECT_EQ(line["active_experts"].size(), 2u);  // router statistics still there
  }
  std::ifstream log(run_dir.path() / "train.log");
  const std::string text((std::istreambuf_iterator<char>(log)), {});
  EXPECT_NE(text.find("| sources: web "), std::string::npos);
  EXPECT_NE(text.find("data: blend of 2 sources (normalised weights): web 0.7000, code_train 0.3000"), std::string::npos);

  // With data.valid_prefix too, the headline is that split's loss, the sources beside it.
  run.data.valid_prefix = prefix("web_valid");
  TempDir with_valid;
  Trainer(run, {with_valid.path()}).run();
  const nlohmann::json first = read_metrics(with_valid.path()).valid.at(0);
  EXPECT_DOUBLE_EQ(first["loss"].get<double>(), first["sources"]["web"]["loss"].get<double>());
}

void write_meta(const std::string& prefix, int64_t vocab_size, int64_t eod_id) {
  std::ofstream(prefix + ".meta.json")
      << nlohmann::json{{"tokenizer", {{"model", "x.model"}, {"vocab_size", vocab_size}, {"eod_id", eod_id},
                                       {"pad_id", -1}, {"unk_id", -1}}},
                        {"documents", 1}, {"tokens", 1}, {"dtype", "uint16"}}
             .dump();
}

TEST_F(BlendTrainerTest, BadBlendsStopNamingTheEntry) {
  TempDir run_dir;
  const auto expect_error = [&](const config::RunConfig& run, const std::string& fragment) {
    const std::string message = trainer_error(run, run_dir.path());
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
  };
  config::RunConfig run = config();
  (*run.data.blend)[1].prefix = prefix("nope");
  expect_error(run, "data.blend[1]: prefix: ");
  expect_error(run, "nope.idx");
  run = config();
  (*run.data.blend)[0].valid_prefix = prefix("nope");
  expect_error(run, "data.blend[0].valid_prefix: ");

  write_meta(prefix("code_train"), 1000, 0);
  expect_error(config(), "data.blend[1]: the vocabulary of " + prefix("code_train") +
                             " (1000, its .meta.json) is larger than model.vocab_size (97)");
  write_meta(prefix("code_train"), 97, 5);
  expect_error(config(), "data.blend[1]: the EOD id of " + prefix("code_train") + " is 5 (its .meta.json), but "
                                                                                  "data.eod_id is 0");
  run = config();
  run.data.eod_id = -1;  // each source's from its .meta.json: they must agree
  write_meta(prefix("web_train"), 97, 0);
  expect_error(run, "data.blend[1]: the EOD id of " + prefix("code_train") + " is 5, data.blend[0]'s is 0");
  write_meta(prefix("code_train"), 96, 0);
  expect_error(run, "data.blend[1]: " + prefix("code_train") + " was tokenized with a vocabulary of 96, "
                                                               "data.blend[0] with 97");
  fs::remove(prefix("code_train") + ".meta.json");
  fs::remove(prefix("web_train") + ".meta.json");

  run = config();
  run.train.seq_length = 64;
  run.model.max_seq_length = 64;
  testing::write_counting_corpus(prefix("short"), 1, 97, 5);
  (*run.data.blend)[1].prefix = prefix("short");
  expect_error(run, "data.blend[1]: " + prefix("short") + " has ");

  // A checkpoint of the other kind of data does not resume.
  TempDir single;
  config::RunConfig plain = testing::tiny_run_config(data_.path().string());
  plain.data.train_prefix = prefix("web_train");
  plain.data.valid_prefix.clear();
  plain.train.max_steps = 1;
  Trainer(plain, {single.path()}).run();
  config::RunConfig blended = config();
  blended.train.max_steps = 2;
  const std::string message = trainer_error(blended, single.path());
  EXPECT_NE(message.find("data.blend: is set, but"), std::string::npos) << message;
  TempDir two;
  Trainer(blended, {two.path(), /*exit_after_steps=*/1}).run();
  blended.data.blend->push_back({prefix("code_train"), 0.1, "", "more"});
  const std::string three = trainer_error(blended, two.path());
  EXPECT_NE(three.find("data.blend: does not fit the sampler state"), std::string::npos) << three;
  EXPECT_NE(three.find("2 sources, but the blend has 3"), std::string::npos) << three;
  const std::string back = trainer_error(plain, two.path());
  EXPECT_NE(back.find("data.train_prefix: is set, but"), std::string::npos) << back;
}

}  // namespace
}  // namespace yuanmoe::train
