// The training loop (one place, top to bottom): build the model and optimizer from the config,
// resume from the newest complete checkpoint in the run dir (or start a fine-tune from
// train.init_from), then per optimizer step: the step (train/step.h), log, evaluate and
// checkpoint (train/checkpointer.h).
// Parallelism is applied around this loop, not inside the model: the model is this rank's
// pipeline stage (StageSpec), the step runs the micro-batches through train/pipeline.h and
// reduces gradients and metrics over the process groups. One process is the case where every
// group has one member and every collective is a no-op.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <spdlog/logger.h>

#include "yuanmoe/config/config.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/checkpointer.h"
#include "yuanmoe/train/evaluator.h"
#include "yuanmoe/train/metrics.h"
#include "yuanmoe/train/step.h"
#include "yuanmoe/train/tensorboard.h"
#include "yuanmoe/train/training_data.h"

namespace yuanmoe::train {

namespace fs = std::filesystem;

/// How this invocation runs; not part of the run's config.
struct TrainerOptions {
  fs::path run_dir;
  /// Stop after this many optimizer steps in this invocation, saving a checkpoint (Megatron's
  /// --exit-interval); 0 = run to train.max_steps. A later `train` resumes from there.
  int64_t exit_after_steps = 0;
  /// The process groups of a multi-process run; default: this process alone.
  parallel::ParallelContext parallel;
  /// Debugging (`train --debug-nonfinite-steps`, docs/reliability.md): at these 1-based steps
  /// every rank's gradients are poisoned with NaN after the backward pass, as a diverging step
  /// would leave them.
  std::set<int64_t> nonfinite_steps;
};

struct TrainSummary {
  int64_t first_step = 0;  // steps already done when this invocation started
  int64_t last_step = 0;
  double last_loss = 0.0;
  std::optional<EvalResult> first_eval, last_eval;  // of this invocation
  fs::path last_checkpoint;
};

class Trainer {
 public:
  /// Builds everything; throws ConfigError / std::runtime_error naming the key or file on bad
  /// input (missing data, a checkpoint of another architecture, ...).
  Trainer(const config::RunConfig& config, TrainerOptions options);
  TrainSummary run();

  model::Transformer& model() { return model_; }
  int64_t step() const { return progress_.step; }

 private:
  void resume_or_initialise();
  TrainSummary already_complete(TrainSummary summary) const;
  void log_start(int64_t stop_step) const;
  void log_memory_per_rank() const;
  /// The warning of a skipped step; the memory per rank after the first applied one.
  void log_step_outcome(const StepResult& result);
  void log_interval(StepInterval& interval, const StepResult& result, const ProgressBar& bar);
  EvalResult evaluate();
  fs::path save();
  void redraw_plots();
  /// A metrics line to metrics.jsonl and TensorBoard (rank 0).
  void write_metrics(const nlohmann::ordered_json& line);
  void info(const std::string& message) { console_->info(message); }
  bool is_logging_rank() const { return parallel_.world().rank == 0; }

  const config::RunConfig config_;
  const TrainerOptions options_;
  parallel::ParallelContext parallel_;
  const torch::Device device_;
  std::shared_ptr<spdlog::logger> console_;  // terminal and train.log
  std::shared_ptr<spdlog::logger> file_;     // train.log only (step lines under a progress bar)

  model::Transformer model_{nullptr};
  std::unique_ptr<DistributedOptimizer> optimizer_;
  std::unique_ptr<OptimizerStep> step_;
  std::unique_ptr<CheckpointManager> checkpoints_;
  std::unique_ptr<TrainingData> data_;  // the training batches and the validation splits
  std::unique_ptr<Evaluator> evaluator_;
  std::unique_ptr<MetricsLog> metrics_;
  std::unique_ptr<TensorBoardLog> tensorboard_;  // rank 0 with log.tensorboard
  checkpoint::TrainingProgress progress_;  // step, tokens seen; the sampler state at each save
  double peak_flops_ = 0.0;
  double flops_per_token_ = 0.0;
  bool plots_enabled_ = true;
  bool memory_logged_ = false;
};

}  // namespace yuanmoe::train
