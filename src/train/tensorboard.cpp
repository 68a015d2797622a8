#include "yuanmoe/train/tensorboard.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iterator>

namespace yuanmoe::train {

namespace {

using ordered_json = nlohmann::ordered_json;

void add_number(TensorBoardPoints& points, const std::string& tag, const ordered_json& value) {
  if (value.is_number()) points.scalars.emplace_back(tag, value.get<double>());
}

/// "moe/layer_07/<name>": zero-padded so TensorBoard sorts the layers in order.
std::string layer_tag(size_t layer, const std::string& name) { return fmt::format("moe/layer_{:02d}/{}", layer, name); }

void add_training_points(TensorBoardPoints& points, const ordered_json& line) {
  // A skipped non-finite step logs null losses: no point, the skipped count says why.
  if (line.contains("loss") && line["loss"].is_number() && line.contains("aux_loss") && line["aux_loss"].is_number()) {
    points.scalars.emplace_back("train/loss", line["loss"].get<double>() + line["aux_loss"].get<double>());
  }
  add_number(points, "train/lm_loss", line.value("loss", ordered_json()));
  add_number(points, "train/aux_loss", line.value("aux_loss", ordered_json()));
  for (const char* key : {"lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "skipped_steps", "peak_rss_mib",
                          "pipeline_bubble"}) {
    add_number(points, std::string("train/") + key, line.value(key, ordered_json()));
  }
}

void add_evaluation_points(TensorBoardPoints& points, const ordered_json& line) {
  add_number(points, "valid/loss", line.value("loss", ordered_json()));
  add_number(points, "valid/perplexity", line.value("perplexity", ordered_json()));
  if (line.contains("sources")) {
    for (const auto& [name, source] : line["sources"].items()) {
      add_number(points, "valid/" + name + "/loss", source.value("loss", ordered_json()));
      add_number(points, "valid/" + name + "/perplexity", source.value("perplexity", ordered_json()));
    }
  }
  for (const char* key : {"load_cv", "experts_under_1pct", "router_entropy", "active_experts", "router_ties",
                          "router_exact_ties"}) {
    if (!line.contains(key)) continue;
    const ordered_json& per_layer = line[key];
    for (size_t l = 0; l < per_layer.size(); ++l) add_number(points, layer_tag(l, key), per_layer[l]);
  }
  if (line.contains("expert_load")) {
    const ordered_json& load_LE = line["expert_load"];
    for (size_t l = 0; l < load_LE.size(); ++l) {
      points.histograms.emplace_back(layer_tag(l, "expert_share"),
                                     histogram_of(load_LE[l].get<std::vector<double>>(), 30));
    }
  }
}

}  // namespace

TensorBoardPoints tensorboard_points(const ordered_json& metrics_line) {
  TensorBoardPoints points;
  if (metrics_line.value("split", "train") == "valid") {
    add_evaluation_points(points, metrics_line);
  } else {
    add_training_points(points, metrics_line);
  }
  return points;
}

Histogram histogram_of(const std::vector<double>& values, int buckets) {
  Histogram histogram;
  if (values.empty()) return histogram;
  histogram.min = *std::min_element(values.begin(), values.end());
  histogram.max = *std::max_element(values.begin(), values.end());
  histogram.count = static_cast<double>(values.size());
  for (const double v : values) {
    histogram.sum += v;
    histogram.sum_squares += v * v;
  }
  // Bucket i holds (limit[i-1], limit[i]]; the first holds everything up to its limit.
  const double width = (histogram.max - histogram.min) / buckets;
  if (width <= 0) {
    histogram.bucket_limits = {histogram.max};
    histogram.buckets = {histogram.count};
    return histogram;
  }
  histogram.buckets.assign(static_cast<size_t>(buckets), 0.0);
  for (int i = 0; i < buckets; ++i) histogram.bucket_limits.push_back(histogram.min + width * (i + 1));
  histogram.bucket_limits.back() = histogram.max;
  for (const double v : values) {
    const auto i = static_cast<size_t>(std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil((v - histogram.min) / width)) - 1, 0, buckets - 1));
    histogram.buckets[i] += 1.0;
  }
  return histogram;
}

TensorBoardLog::TensorBoardLog(const std::filesystem::path& directory, int64_t resume_step,
                               std::function<void(const std::string&)> warn)
    : warn_(std::move(warn)), directory_(directory.string()) {
  guarded([&] { writer_ = std::make_unique<EventFileWriter>(directory_, resume_step + 1); });
}

TensorBoardLog::~TensorBoardLog() = default;

void TensorBoardLog::write(const ordered_json& metrics_line) {
  if (!writer_) return;
  guarded([&] {
    const int64_t step = metrics_line.at("step").get<int64_t>();
    const TensorBoardPoints points = tensorboard_points(metrics_line);
    for (const auto& [tag, value] : points.scalars) writer_->add_scalar(step, tag, value);
    for (const auto& [tag, histogram] : points.histograms) writer_->add_histogram(step, tag, histogram);
    writer_->flush();
    ++lines_;
  });
}

void TensorBoardLog::write_image(int64_t step, const std::string& tag, const std::filesystem::path& png) {
  if (!writer_) return;
  std::ifstream in(png, std::ios::binary);
  if (!in) return;
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  guarded([&] {
    writer_->add_png(step, tag, bytes);
    writer_->flush();
  });
}

void TensorBoardLog::guarded(const std::function<void()>& write) {
  const auto start = std::chrono::steady_clock::now();
  try {
    write();
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } catch (const std::exception& error) {
    warn_(fmt::format("TensorBoard logging off for the rest of this run: {} (directory {}); metrics.jsonl and "
                      "checkpoints go on",
                      error.what(), directory_));
    writer_.reset();
  }
}

}  // namespace yuanmoe::train
