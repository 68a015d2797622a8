// The training loop (one place, top to bottom): build the model and optimizer from the config,
// resume from the newest complete checkpoint in the run dir (or start a fine-tune from
// train.init_from), then per optimizer step: accumulate gradients over micro-batches, clip,
// update, update the routers' balancing state, log, evaluate and checkpoint.
// Single process today; data and pipeline parallelism (issue 6) plug in around the same loop.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <spdlog/logger.h>

#include "yuanmoe/config/config.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/train/evaluate.h"
#include "yuanmoe/train/metrics.h"

namespace yuanmoe::train {

namespace fs = std::filesystem;

/// How this invocation runs; not part of the run's config.
struct TrainerOptions {
  fs::path run_dir;
  /// Stop after this many optimizer steps in this invocation, saving a checkpoint (Megatron's
  /// --exit-interval); 0 = run to train.max_steps. A later `train` resumes from there.
  int64_t exit_after_steps = 0;
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
  int64_t step() const { return step_; }

 private:
  /// What one optimizer step measured.
  struct StepResult {
    double loss = 0.0;      // language-model loss, mean over the global batch
    double aux_loss = 0.0;  // router terms as added to the loss
    double grad_norm = 0.0;
    double lr = 0.0;
    Tensor pairs_LE;        // routed pairs per MoE layer and expert (int64, CPU)
  };

  void resume_or_initialise();
  StepResult train_step();
  void update_routers(const Tensor& pairs_LE, int64_t tokens);
  EvalResult run_evaluation();
  fs::path save();
  void info(const std::string& message);

  const config::RunConfig config_;
  const TrainerOptions options_;
  const torch::Device device_;
  std::shared_ptr<spdlog::logger> console_;  // terminal and train.log
  std::shared_ptr<spdlog::logger> file_;     // train.log only (step lines under a progress bar)

  model::Transformer model_{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::vector<Tensor> parameters_;
  std::unique_ptr<data::GptSampler> train_sampler_;
  std::shared_ptr<const data::IndexedDataset> valid_dataset_;
  data::SamplerOptions valid_options_;
  std::unique_ptr<MetricsLog> metrics_;
  int64_t micro_batches_per_step_ = 1;
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  double peak_flops_ = 0.0;
  double flops_per_token_ = 0.0;
  bool plots_enabled_ = true;
};

}  // namespace yuanmoe::train
