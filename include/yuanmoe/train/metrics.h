// run_dir/metrics.jsonl: one JSON object per logged step and per evaluation ("split": "valid";
// keys in docs/training.md), and the terminal side of the same numbers (progress bar or log
// lines).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "yuanmoe/core/types.h"
#include "yuanmoe/train/evaluator.h"
#include "yuanmoe/train/step.h"

namespace yuanmoe::train {

/// The steps since the last log line, and the line they make.
class StepInterval {
 public:
  void add(const StepResult& result, double seconds, int64_t tokens);

  struct Line {
    nlohmann::ordered_json json;  // for metrics.jsonl
    std::string text;             // for the terminal and train.log
  };
  /// The line for step `step` (the last one added; `result` its result) and a fresh interval.
  /// MFU against `peak_flops` per process over `processes`; pipeline_bubble when `pipelined`.
  Line take(int64_t step, int64_t max_steps, const StepResult& result, int64_t tokens_seen, double flops_per_token,
            double peak_flops, int64_t processes, bool pipelined, const std::string& eta);

 private:
  double seconds_ = 0.0;
  int64_t tokens_ = 0;
  int64_t skipped_steps_ = 0;
  Tensor routed_pairs_LE_;
};

/// The metrics.jsonl object of an evaluation at `step`: the headline loss, each MoE layer's
/// expert load, mean routing entropy and active experts per token, and a "sources" object
/// {name: {"loss", "perplexity", "tokens"}, ...} in blend order when there are blend sources.
nlohmann::ordered_json eval_line(int64_t step, const EvalReport& report);
/// Its line for the terminal and train.log.
std::string eval_text(int64_t step, const EvalReport& report);

class MetricsLog {
 public:
  /// Opens `path` for appending. Lines of steps after `resume_step` are dropped first: they were
  /// written by a run killed after its last checkpoint and will be produced again.
  MetricsLog(std::filesystem::path path, int64_t resume_step);
  void write(const nlohmann::ordered_json& line);
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

/// A one-line bar with rate and ETA redrawn in place on a terminal; nothing otherwise (the
/// trainer logs plain lines instead).
class ProgressBar {
 public:
  ProgressBar(int64_t first_step, int64_t last_step, bool enabled);
  void update(int64_t step, double loss, double tokens_per_s);
  /// Erases the bar so a log line can be printed; the next update redraws it.
  void clear();
  void finish();
  bool enabled() const { return enabled_; }
  /// "3m10s" for the steps left at the average rate since the start.
  std::string eta(int64_t step) const;

 private:
  int64_t first_step_, last_step_;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// 12345.6 -> "12.3k"; 1.2e6 -> "1.20M".
std::string human_count(double value);
/// seconds -> "1h02m", "3m10s", "42s".
std::string human_duration(double seconds);

}  // namespace yuanmoe::train
