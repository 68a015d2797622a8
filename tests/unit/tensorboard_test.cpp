// What TensorBoard shows of metrics.jsonl lines (train/tensorboard.h): the tags of a training and
// an evaluation line, histograms against an explicit count, and an unwritable directory.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "support/temp_dir.h"
#include "yuanmoe/train/tensorboard.h"

namespace yuanmoe::train {
namespace {

using ordered_json = nlohmann::ordered_json;

std::map<std::string, double> scalars_of(const ordered_json& line) {
  std::map<std::string, double> scalars;
  for (const auto& [tag, value] : tensorboard_points(line).scalars) {
    EXPECT_TRUE(scalars.emplace(tag, value).second) << "tag twice: " << tag;
  }
  return scalars;
}

TEST(TensorBoardPointsTest, ATrainingLineGivesTrainTags) {
  const auto line = ordered_json::parse(R"({"step": 7, "loss": 3.5, "aux_loss": 0.25, "lr": 1e-3,
      "grad_norm": 0.5, "tokens_per_s": 2000, "tokens_seen": 14336, "skipped_steps": 0, "mfu": 0.1,
      "peak_rss_mib": 900, "expert_load": [[0.5, 0.5]]})");
  const std::map<std::string, double> want{
      {"train/loss", 3.75},       {"train/lm_loss", 3.5},      {"train/aux_loss", 0.25},
      {"train/lr", 1e-3},         {"train/grad_norm", 0.5},    {"train/tokens_per_s", 2000},
      {"train/tokens_seen", 14336}, {"train/skipped_steps", 0}, {"train/mfu", 0.1},
      {"train/peak_rss_mib", 900}};
  EXPECT_EQ(scalars_of(line), want);
  EXPECT_TRUE(tensorboard_points(line).histograms.empty());
}

TEST(TensorBoardPointsTest, ASkippedStepGivesNoLossPoint) {
  const auto line = ordered_json::parse(
      R"({"step": 3, "loss": null, "aux_loss": null, "lr": 1e-3, "skipped": true, "skipped_steps": 1})");
  EXPECT_EQ(scalars_of(line), (std::map<std::string, double>{{"train/lr", 1e-3}, {"train/skipped_steps", 1}}));
}

TEST(TensorBoardPointsTest, AnEvaluationLineGivesValidSourceAndLayerTags) {
  const auto line = ordered_json::parse(R"({"step": 50, "split": "valid", "loss": 4.0, "perplexity": 54.6,
      "tokens": 100, "expert_load": [[0.25, 0.75], [0.5, 0.5]], "router_entropy": [0.6, 0.69],
      "active_experts": [2, 2], "load_cv": [0.5, 0], "experts_under_1pct": [0, 0],
      "router_ties": [0.1, 0], "router_exact_ties": [0.05, 0],
      "sources": {"code": {"loss": 3.0, "perplexity": 20.1, "tokens": 40}}})");
  const std::map<std::string, double> scalars = scalars_of(line);
  EXPECT_EQ(scalars.size(), 2u + 2u + 2u * 6u);
  EXPECT_EQ(scalars.at("valid/loss"), 4.0);
  EXPECT_EQ(scalars.at("valid/code/perplexity"), 20.1);
  EXPECT_EQ(scalars.at("moe/layer_00/router_exact_ties"), 0.05);
  EXPECT_EQ(scalars.at("moe/layer_01/router_entropy"), 0.69);
  EXPECT_EQ(scalars.at("moe/layer_00/load_cv"), 0.5);
  const auto histograms = tensorboard_points(line).histograms;
  ASSERT_EQ(histograms.size(), 2u);
  EXPECT_EQ(histograms[1].first, "moe/layer_01/expert_share");
  EXPECT_EQ(histograms[0].second.count, 2.0);
}

TEST(HistogramTest, BucketsCountEachValueOnceAsAnExplicitScanDoes) {
  const std::vector<double> values{0.0, 0.1, 0.1, 0.35, 0.5, 0.9, 1.0, 0.49};
  const int buckets = 4;
  const Histogram h = histogram_of(values, buckets);
  EXPECT_EQ(h.min, 0.0);
  EXPECT_EQ(h.max, 1.0);
  EXPECT_EQ(h.count, 8.0);
  EXPECT_DOUBLE_EQ(h.sum, 3.44);
  EXPECT_DOUBLE_EQ(h.sum_squares, 0.0 + 0.01 + 0.01 + 0.1225 + 0.25 + 0.81 + 1.0 + 0.2401);
  ASSERT_EQ(h.bucket_limits, (std::vector<double>{0.25, 0.5, 0.75, 1.0}));
  // (-inf, 0.25], (0.25, 0.5], (0.5, 0.75], (0.75, 1.0], as TensorBoard reads bucket limits.
  std::vector<double> want(buckets, 0.0);
  for (const double v : values) {
    size_t i = 0;
    while (i + 1 < h.bucket_limits.size() && v > h.bucket_limits[i]) ++i;
    want[i] += 1.0;
  }
  EXPECT_EQ(h.buckets, want);
  EXPECT_EQ(h.buckets, (std::vector<double>{3, 3, 0, 2}));
}

TEST(HistogramTest, EqualValuesAreOneBucket) {
  const Histogram h = histogram_of({0.25, 0.25, 0.25, 0.25}, 30);
  EXPECT_EQ(h.bucket_limits, (std::vector<double>{0.25}));
  EXPECT_EQ(h.buckets, (std::vector<double>{4}));
}

TEST(TensorBoardLogTest, AnUnwritableDirectoryIsOneWarningAndTheLogStaysOff) {
  const testing::TempDir dir;
  std::ofstream(dir / "tensorboard") << "a file where the directory should be\n";
  std::vector<std::string> warnings;
  TensorBoardLog log(dir.path() / "tensorboard", 0, [&](const std::string& line) { warnings.push_back(line); });
  log.write(ordered_json::parse(R"({"step": 1, "loss": 3.0, "aux_loss": 0.0})"));
  EXPECT_FALSE(log.enabled());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find(dir / "tensorboard"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("metrics.jsonl and checkpoints go on"), std::string::npos) << warnings[0];
  EXPECT_EQ(log.lines(), 0);
}

}  // namespace
}  // namespace yuanmoe::train
