// The training loop (one place, top to bottom): build the model and optimizer from the config,
// resume from the newest complete checkpoint in the run dir (or start a fine-tune from
// train.init_from), then per optimizer step: accumulate gradients over micro-batches, clip,
// update, update the routers' balancing state, log, evaluate and checkpoint.
// Parallelism is applied around this loop, not inside the model: the model is this rank's
// pipeline stage (StageSpec), the micro-batches run through train/pipeline.h, gradients are
// summed across the tied embedding's copies and averaged across data-parallel ranks, and
// metrics and expert loads are reduced over the world. One process is the case where every
// group has one member and every collective is a no-op.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <spdlog/logger.h>

#include "yuanmoe/config/config.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
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
  /// The process groups of a multi-process run; default: this process alone.
  parallel::ParallelContext parallel;
  /// Fault injection (tests, docs/reliability.md): at these 1-based steps every rank's gradients
  /// are poisoned with NaN after the backward pass, as a diverging step would leave them.
  std::set<int64_t> inject_nonfinite_steps;
};

/// Layers [first, end) of pipeline stage `stage` of `stages`: contiguous; the first and last
/// stage get `first_layers` / `last_layers` when those are > 0, and the other stages share the
/// rest in sizes differing by at most one (earlier stages take the remainder). Embedding on the
/// first stage, head on the last.
model::StageSpec balanced_stage(int64_t num_layers, int64_t stages, int64_t stage, int64_t first_layers = 0,
                                int64_t last_layers = 0);

/// Loads the weights of the checkpoint train.init_from names into `model` (its pipeline stage's
/// part), after checking that the checkpoint's architecture matches the config (a fine-tune may
/// change the context keys). Returns the checkpoint's directory and step. Throws naming the
/// directory and keys otherwise.
std::pair<fs::path, int64_t> load_init_from(torch::nn::Module& model, const config::RunConfig& config);

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
    double pipeline_bubble = 0.0;  // stages' mean fraction of the schedule spent waiting (pp > 1)
    bool skipped = false;          // non-finite and train.on_nonfinite = skip: nothing applied
    Tensor pairs_LE;        // routed pairs per MoE layer and expert (int64, CPU)
  };

  void resume_or_initialise();
  StepResult train_step();
  /// This stage's [L_stage, E] counts -> the whole model's [L_moe, E], summed over the world.
  /// This stage's rows [L_stage, width] placed at its global MoE layers and summed over the world
  /// (stages fill their rows, data-parallel ranks add): [total MoE layers, width].
  Tensor global_moe_rows(const Tensor& stage_rows_LX, int64_t width, torch::Dtype dtype);
  Tensor global_expert_counts(const Tensor& stage_pairs_LE);
  /// Takes every local router's eval statistics: [total MoE layers, (entropy sum, tokens)] fp64.
  Tensor take_router_eval_stats();
  void update_routers(const Tensor& pairs_LE, int64_t tokens);
  EvalResult run_evaluation();
  fs::path save();
  void info(const std::string& message);
  bool is_logging_rank() const { return parallel_.world().rank == 0; }

  const config::RunConfig config_;
  const TrainerOptions options_;
  parallel::ParallelContext parallel_;
  model::StageSpec stage_;
  int64_t moe_layers_before_stage_ = 0;  // global index of this stage's first MoE layer
  int64_t total_moe_layers_ = 0;
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
  int64_t micro_batches_per_step_ = 1;  // on this data-parallel rank
  int64_t micro_batches_per_global_batch_ = 1;
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  int64_t consecutive_skips_ = 0;  // non-finite steps in a row (train.on_nonfinite = skip)
  double peak_flops_ = 0.0;
  double flops_per_token_ = 0.0;
  bool plots_enabled_ = true;
};

}  // namespace yuanmoe::train
