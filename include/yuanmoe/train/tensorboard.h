// TensorBoard for a training run (log.tensorboard): rank 0 turns each metrics.jsonl line into
// scalars and histograms in RUN_DIR/tensorboard/ (or log.tensorboard_dir), one event file per
// process start, as Megatron-LM's --tensorboard-dir and torch's SummaryWriter lay them out. The
// tags are listed in docs/training.md ("TensorBoard").
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "yuanmoe/train/event_file.h"

namespace yuanmoe::train {

/// What TensorBoard shows of one metrics.jsonl line: (tag, value) scalars and per-layer
/// histograms of the expert shares. A training line gives train/..., an evaluation line
/// valid/..., valid/<source>/... and moe/layer_NN/....
struct TensorBoardPoints {
  std::vector<std::pair<std::string, double>> scalars;
  std::vector<std::pair<std::string, Histogram>> histograms;
};
TensorBoardPoints tensorboard_points(const nlohmann::ordered_json& metrics_line);

/// `values` as TensorBoard's histogram: `buckets` equal buckets from their min to their max.
Histogram histogram_of(const std::vector<double>& values, int buckets);

class TensorBoardLog {
 public:
  /// Opens a new event file in `directory`. It starts a session at `resume_step` + 1, so
  /// TensorBoard drops what earlier files hold from there on: the steps a killed run logged after
  /// its last checkpoint, which this run logs again. On a failure `warn` gets one line and the
  /// log stays off; training goes on.
  TensorBoardLog(const std::filesystem::path& directory, int64_t resume_step,
                 std::function<void(const std::string&)> warn);
  ~TensorBoardLog();

  /// The points of one metrics.jsonl line, at its "step", flushed to the file.
  void write(const nlohmann::ordered_json& metrics_line);
  /// A PNG file (the expert-load heatmap of plots/) as an image at `step`; nothing if it is absent.
  void write_image(int64_t step, const std::string& tag, const std::filesystem::path& png);
  bool enabled() const { return writer_ != nullptr; }
  std::string path() const { return writer_ ? writer_->path() : ""; }
  /// The metrics lines written so far, and the wall time spent opening the file and writing
  /// them and the images (the log's overhead on the run).
  int64_t lines() const { return lines_; }
  double seconds() const { return seconds_; }

 private:
  /// Runs `write`; on an exception warns once and turns the log off.
  void guarded(const std::function<void()>& write);

  std::function<void(const std::string&)> warn_;
  std::unique_ptr<EventFileWriter> writer_;
  std::string directory_;
  int64_t lines_ = 0;
  double seconds_ = 0.0;
};

}  // namespace yuanmoe::train
