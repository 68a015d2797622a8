#include "yuanmoe/train/trainer.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <string>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/param_count.h"
#include "yuanmoe/model/recompute.h"
#include "yuanmoe/parallel/balance_reducer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/parallel/memory_plan.h"
#include "yuanmoe/train/mfu.h"
#include "yuanmoe/train/pipeline.h"
#include "yuanmoe/train/plots.h"
#include "yuanmoe/train/precision.h"

namespace yuanmoe::train {

namespace {

/// (terminal and log file, log file only): rank 0 talks to the terminal and train.log; every
/// other rank keeps its own train.rankN.log.
std::pair<std::shared_ptr<spdlog::logger>, std::shared_ptr<spdlog::logger>> run_loggers(const fs::path& run_dir,
                                                                                      int64_t rank) {
  const std::string log_name = rank == 0 ? "train.log" : "train.rank" + std::to_string(rank) + ".log";
  auto file_sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>((run_dir / log_name).string());
  auto console_sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto console = rank == 0 ? std::make_shared<spdlog::logger>("train", spdlog::sinks_init_list{console_sink, file_sink})
                           : std::make_shared<spdlog::logger>("train", file_sink);
  auto file = std::make_shared<spdlog::logger>("train.file", file_sink);
  for (auto& logger : {console, file}) {
    logger->set_pattern("[%Y-%m-%d %H:%M:%S] %v");
    logger->flush_on(spdlog::level::info);
  }
  return {console, file};
}

/// `train --debug-nonfinite-steps` (docs/reliability.md): every reduced gradient NaN in the given
/// 1-based steps, as a diverging step would leave them.
std::function<void(int64_t, const std::vector<Tensor>&)> poison_gradients_at(std::set<int64_t> steps) {
  return [steps = std::move(steps)](int64_t step, const std::vector<Tensor>& gradients) {
    if (steps.count(step) == 0) return;
    torch::NoGradGuard no_grad;
    for (Tensor gradient : gradients) gradient.fill_(std::numeric_limits<double>::quiet_NaN());
  };
}

/// Expert parallelism's share of the training steps (not of the evaluations between them), for
/// the summary line at the end of a run.
class ExpertTimesTally {
 public:
  explicit ExpertTimesTally(std::shared_ptr<const parallel::ExpertParallelTimes> times) : times_(std::move(times)) {}
  void begin_step() {
    if (times_) before_ = *times_;
  }
  void end_step(double seconds) {
    if (!times_) return;
    steps_ += 1;
    sums_.all_to_all += times_->all_to_all - before_.all_to_all;
    sums_.experts_forward += times_->experts_forward - before_.experts_forward;
    sums_.experts_backward += times_->experts_backward - before_.experts_backward;
    step_seconds_ += seconds;
  }
  /// "" without expert parallelism or steps.
  std::string summary(int64_t rank) const {
    if (!times_ || steps_ == 0) return "";
    const auto ms = [&](double seconds) { return 1e3 * seconds / static_cast<double>(steps_); };
    return fmt::format("expert parallelism on rank {}, per step: all-to-all {:.1f} ms, experts forward {:.1f} ms + "
                       "backward {:.1f} ms, step {:.1f} ms",
                       rank, ms(sums_.all_to_all), ms(sums_.experts_forward), ms(sums_.experts_backward),
                       ms(step_seconds_));
  }

 private:
  std::shared_ptr<const parallel::ExpertParallelTimes> times_;
  parallel::ExpertParallelTimes before_, sums_;
  double step_seconds_ = 0.0;
  int64_t steps_ = 0;
};

/// The data-parallel gradient reduction left after the backward, per step, past this process's
/// first step (which sets up the collectives' buffers), for the summary line at the end of a run
/// (docs/parallelism.md, "Gradient reduction").
class ReductionTally {
 public:
  ReductionTally(const DistributedOptimizer& optimizer, bool overlap) : optimizer_(optimizer), overlap_(overlap) {}
  void end_step(double seconds) {
    if (++steps_ == 0) {
      before_ = optimizer_.reduction_seconds();
    } else {
      step_seconds_ += seconds;
    }
  }
  /// "" before a second step.
  std::string summary(int64_t rank) const {
    if (steps_ <= 0) return "";
    const double per_step = 1e3 / static_cast<double>(steps_);
    const DistributedOptimizer::ReductionSeconds now = optimizer_.reduction_seconds();
    return fmt::format("gradient reduction on rank {}, per step: {:.1f} ms after the backward, {:.1f} ms of it waiting "
                       "for collectives (overlap {}), step {:.1f} ms",
                       rank, per_step * (now.after_backward - before_.after_backward),
                       per_step * (now.waiting - before_.waiting), overlap_ ? "on" : "off", per_step * step_seconds_);
  }

 private:
  const DistributedOptimizer& optimizer_;
  const bool overlap_;
  DistributedOptimizer::ReductionSeconds before_;
  double step_seconds_ = 0.0;
  int64_t steps_ = -1;  // timed steps: the first is left out
};

bool every(int64_t step, int64_t interval) { return interval > 0 && step % interval == 0; }

}  // namespace

Trainer::Trainer(const config::RunConfig& config, TrainerOptions options)
    : config_(config),
      options_(std::move(options)),
      parallel_(options_.parallel),
      device_(training_device(parallel_.world().local_rank)) {
  const config::TrainConfig& train = config_.train;
  const parallel::ParallelLayout& layout = parallel_.layout();
  fs::create_directories(options_.run_dir);
  std::tie(console_, file_) = run_loggers(options_.run_dir, parallel_.world().rank);
  if (is_logging_rank()) {
    std::ofstream(options_.run_dir / "config.resolved.json") << config::to_json(config_).dump(2) << "\n";
  }
  if (layout.pp != config_.parallel.pipeline_parallel_size) {
    throw std::logic_error("the parallel context was built for another pipeline size");
  }
  if (auto issues = config::validate_training(config_, layout.dp); !issues.empty()) {
    throw config::ConfigError("config", issues);
  }
  data_ = std::make_unique<TrainingData>(config_, layout, [this](const std::string& line) { info(line); });

  // Each parameter's initial value depends only on the seed and its name (init.h), so every
  // layout starts from the same model. Other randomness (dropout) differs per rank.
  torch::manual_seed(static_cast<uint64_t>(train.seed + parallel_.world().rank));
  model_ = model::Transformer(config_.model, config_.moe,
                              model::balanced_stage(config_.model.num_layers, layout.pp, layout.stage,
                                                    config_.parallel.first_stage_layers,
                                                    config_.parallel.last_stage_layers));
  model::init_weights(*model_, config_.model, static_cast<uint64_t>(train.seed));
  parallel::ExpertSharding experts = parallel::apply_expert_parallel(*model_, parallel_);
  parallel::apply_balance_reducer(*model_, parallel_);  // moe.balance_scope = global_batch
  model::apply_recompute(*model_, train.recompute);
  model_->to(device_);
  // fp64: the fp32 initial values, widened (equivalence checks, docs/parallelism.md).
  if (train.precision == config::Precision::kFp64) model_->to(torch::kDouble);
  model_->train();
  optimizer_ = std::make_unique<DistributedOptimizer>(*model_, train, parallel_, config_.parallel.shard_optimizer,
                                                      std::move(experts), config_.parallel.overlap_grad_reduce,
                                                      bucket_bytes(config_.parallel));
  step_ = std::make_unique<OptimizerStep>(config_, *model_, *optimizer_, parallel_);
  if (!options_.nonfinite_steps.empty()) step_->after_reduction = poison_gradients_at(options_.nonfinite_steps);
  evaluator_ = std::make_unique<Evaluator>(config_, *model_, parallel_, data_->validation());
  checkpoints_ = std::make_unique<CheckpointManager>(config_, options_.run_dir / config_.checkpoint.dir, parallel_,
                                                     device_);

  flops_per_token_ = training_flops_per_token(config_);
  // Only rank 0 reports MFU; the peak is per process.
  peak_flops_ = config_.log.peak_tflops > 0 ? config_.log.peak_tflops * 1e12
                : !is_logging_rank()        ? 0.0
                                            : measure_peak_flops(device_, compute_dtype(train.precision));
  plots_enabled_ = config_.log.plots;
  resume_or_initialise();
  if (is_logging_rank()) metrics_ = std::make_unique<MetricsLog>(options_.run_dir / "metrics.jsonl", progress_.step);
  if (is_logging_rank() && config_.log.tensorboard) {
    const fs::path dir = options_.run_dir / (config_.log.tensorboard_dir.empty() ? "tensorboard" : config_.log.tensorboard_dir);
    tensorboard_ = std::make_unique<TensorBoardLog>(dir, progress_.step,
                                                    [this](const std::string& line) { console_->warn(line); });
  }
}

void Trainer::log_memory_per_rank() const {
  // Measured from the live tensors once AdamW has state, in every rank's log, beside what
  // `yuanmoe inspect --world-size` computes for this layout (docs/parallelism.md, "Memory per rank").
  int64_t parameter_bytes = 0;
  for (const Tensor& p : model_->parameters()) parameter_bytes += p.nbytes();
  std::string planned;
  if (config_.train.precision != config::Precision::kFp64) {  // the plan counts fp32 weights
    const parallel::StageMemory stage =
        parallel::memory_plan(config_, parallel_.world().world_size).stages[static_cast<size_t>(parallel_.layout().stage)];
    planned = fmt::format(" (inspect: parameters {} bytes, AdamW state {} bytes)", stage.parameter_bytes,
                          stage.optimizer_bytes);
  }
  console_->info(fmt::format("memory on rank {}: parameters {} bytes, AdamW state {} bytes{}", parallel_.world().rank,
                             parameter_bytes, optimizer_->state_bytes(), planned));
}

void Trainer::resume_or_initialise() {
  const Resumed restored = checkpoints_->restore(*model_, *optimizer_);
  for (const std::string& note : restored.notes) info("note: " + note);
  if (restored.kind == Resumed::Kind::kResumed) {
    data_->restore(restored.progress, restored.dir);
    progress_ = restored.progress;
    info("resumed from " + restored.dir.string() + " at step " + std::to_string(progress_.step));
  } else if (restored.kind == Resumed::Kind::kFineTune) {
    info("fine-tuning from " + restored.dir.string() + " (step " + std::to_string(restored.init_step) +
         "): weights loaded; optimizer, schedule and data start fresh at seq_length " +
         std::to_string(config_.train.seq_length) + ", rope_base " + std::to_string(config_.model.rope_base));
  }
}

TrainSummary Trainer::run() {
  const config::TrainConfig& train = config_.train;
  const int64_t tokens_per_step = step_->derived().tokens_per_step;
  TrainSummary summary;
  summary.first_step = summary.last_step = progress_.step;
  if (progress_.step >= train.max_steps) return already_complete(summary);
  const int64_t stop_step = options_.exit_after_steps > 0
                                ? std::min(train.max_steps, progress_.step + options_.exit_after_steps)
                                : train.max_steps;
  log_start(stop_step);
  if (evaluator_->has_splits() && progress_.step == 0) {
    summary.first_eval = summary.last_eval = evaluate();  // the baseline later evaluations are read against
  }

  ProgressBar bar(progress_.step, train.max_steps, config_.log.progress && is_logging_rank());
  StepInterval interval;
  ExpertTimesTally expert_times(optimizer_->experts().times);
  ReductionTally reduction(*optimizer_, config_.parallel.overlap_grad_reduce);
  while (progress_.step < stop_step) {
    const auto start = std::chrono::steady_clock::now();
    expert_times.begin_step();
    const StepResult result = step_->run(progress_.step, [&] { return data_->next_batch(); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    expert_times.end_step(seconds);
    reduction.end_step(seconds);
    log_step_outcome(result);
    const int64_t step = ++progress_.step;
    progress_.tokens_seen += tokens_per_step;
    interval.add(result, seconds, tokens_per_step);
    summary.last_loss = result.loss;
    bar.update(step, result.loss, static_cast<double>(tokens_per_step) / seconds);

    const bool last = step == train.max_steps || step == stop_step;
    if (every(step, config_.log.interval) || last) log_interval(interval, result, bar);
    const bool eval_now = evaluator_->has_splits() && (every(step, train.eval_interval) || step == train.max_steps);
    const bool save_now = every(step, config_.checkpoint.interval) || last;
    if (eval_now || save_now) bar.clear();
    if (eval_now) {
      summary.last_eval = evaluate();
      if (!summary.first_eval) summary.first_eval = summary.last_eval;
    }
    if (save_now) summary.last_checkpoint = save();
    if (eval_now || save_now) redraw_plots();
  }
  bar.finish();
  summary.last_step = progress_.step;
  if (const std::string line = expert_times.summary(parallel_.world().rank); !line.empty()) console_->info(line);
  if (const std::string line = reduction.summary(parallel_.world().rank); !line.empty() && parallel_.layout().dp > 1) {
    console_->info(line);
  }
  if (tensorboard_ && tensorboard_->lines() > 0) {
    file_->info(fmt::format("TensorBoard: {} lines written to {} in {:.1f} ms ({:.3f} ms per line)",
                            tensorboard_->lines(), tensorboard_->path(), 1e3 * tensorboard_->seconds(),
                            1e3 * tensorboard_->seconds() / static_cast<double>(tensorboard_->lines())));
  }
  if (progress_.step < train.max_steps) {
    info("stopped after " + std::to_string(progress_.step - summary.first_step) + " steps (--exit-after-steps); rerun "
         "the same command to continue from " + summary.last_checkpoint.string());
  }
  return summary;
}

TrainSummary Trainer::already_complete(TrainSummary summary) const {
  console_->info("run already complete: step " + std::to_string(progress_.step) + " of " +
                 std::to_string(config_.train.max_steps));
  if (auto latest = checkpoint::find_latest_checkpoint(options_.run_dir / config_.checkpoint.dir)) {
    summary.last_checkpoint = *latest;
  }
  return summary;
}

void Trainer::log_start(int64_t stop_step) const {
  const config::TrainConfig& train = config_.train;
  const config::DerivedValues& derived = step_->derived();
  const model::ModelSize size = model::model_size(config_.model, config_.moe, train.seq_length);
  console_->info(fmt::format(
      "training {} parameters ({} active) on {} ({} threads) | {} tokens/step, {} micro-batches | steps {}..{} of {} "
      "| peak {:.0f} GFLOP/s{}",
      size.total_parameters, size.active_parameters, device_.str(), at::get_num_threads(), derived.tokens_per_step,
      derived.micro_batches_per_step, progress_.step + 1, stop_step, train.max_steps, peak_flops_ / 1e9,
      config_.log.peak_tflops > 0 ? " (config)" : " (measured)"));
  if (!parallel_.distributed()) return;
  const parallel::ParallelLayout& layout = parallel_.layout();
  console_->info(fmt::format(
      "rank {} of {} ({}): data-parallel {} of {}, pipeline stage {} of {} (layers {}..{}), expert-parallel {} of {}, "
      "{} micro-batches per step on this rank, schedule {}, optimizer {}",
      parallel_.world().rank, parallel_.world().world_size, parallel_.world().launcher, layout.dp_rank, layout.dp,
      layout.stage, layout.pp, model_->stage.first_layer, model_->stage.end_layer - 1, layout.ep_rank, layout.ep,
      derived.micro_batches_per_rank, config::to_string(config_.parallel.pipeline_schedule),
      optimizer_->sharded() ? "sharded over data-parallel ranks" : "replicated"));
}

void Trainer::log_step_outcome(const StepResult& result) {
  if (result.skipped) {
    console_->warn(result.nonfinite);
  } else if (!memory_logged_) {
    log_memory_per_rank();  // AdamW has state now
    memory_logged_ = true;
  }
}

void Trainer::log_interval(StepInterval& interval, const StepResult& result, const ProgressBar& bar) {
  const int64_t step = progress_.step;
  const StepInterval::Line line =
      interval.take(step, config_.train.max_steps, result, progress_.tokens_seen, flops_per_token_, peak_flops_,
                    parallel_.world().world_size, parallel_.layout().pp > 1, bar.eta(step));
  if (is_logging_rank()) write_metrics(line.json);
  (bar.enabled() ? file_ : console_)->info(line.text);
}

EvalResult Trainer::evaluate() {
  const EvalReport report = evaluator_->run();
  if (is_logging_rank()) {
    write_metrics(eval_line(progress_.step, report));
    info(eval_text(progress_.step, report));
  }
  return report.headline;
}

fs::path Trainer::save() {
  data_->save(progress_);
  const fs::path dir = checkpoints_->save(progress_, *model_, *optimizer_);
  info("checkpoint " + dir.string());
  return dir;
}

void Trainer::write_metrics(const nlohmann::ordered_json& line) {
  metrics_->write(line);
  if (tensorboard_) tensorboard_->write(line);
}

void Trainer::redraw_plots() {
  if (!plots_enabled_ || !is_logging_rank()) return;
  if (const std::string problem = render_plots(options_.run_dir); !problem.empty()) {
    console_->warn(problem);
    plots_enabled_ = false;  // warn once
    return;
  }
  if (tensorboard_) tensorboard_->write_image(progress_.step, "moe/expert_load", options_.run_dir / "plots" / "expert_load.png");
}

}  // namespace yuanmoe::train
