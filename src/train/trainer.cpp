#include "yuanmoe/train/trainer.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>

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
                                                      std::move(experts));
  step_ = std::make_unique<OptimizerStep>(config_, *model_, *optimizer_, parallel_);
  if (!options_.nonfinite_steps.empty()) {
    step_->after_backward = [steps = options_.nonfinite_steps](int64_t step, const std::vector<Tensor>& parameters) {
      if (steps.count(step) == 0) return;
      torch::NoGradGuard no_grad;
      for (const Tensor& parameter : parameters) {
        if (parameter.grad().defined()) parameter.mutable_grad().fill_(std::numeric_limits<double>::quiet_NaN());
      }
    };
  }
  checkpoints_ = std::make_unique<CheckpointManager>(config_, options_.run_dir / config_.checkpoint.dir, parallel_,
                                                     device_);

  flops_per_token_ = training_flops_per_token(config_);
  // Only rank 0 reports MFU; the peak is per process.
  const auto peak_dtype = train.precision == config::Precision::kBf16   ? torch::kBFloat16
                          : train.precision == config::Precision::kFp64 ? torch::kDouble
                                                                        : torch::kFloat;
  peak_flops_ = config_.log.peak_tflops > 0 ? config_.log.peak_tflops * 1e12
                : !is_logging_rank()        ? 0.0
                                            : measure_peak_flops(device_, peak_dtype);
  plots_enabled_ = config_.log.plots;
  resume_or_initialise();
  if (is_logging_rank()) metrics_ = std::make_unique<MetricsLog>(options_.run_dir / "metrics.jsonl", progress_.step);
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

EvalResult Trainer::evaluate_and_log() {
  // Data-parallel ranks split the eval micro-batches (the sampler interleaves them by rank);
  // the stages pass activations forward; sums are reduced over the world. Every rank runs every
  // split in the same order (collectives).
  const parallel::ParallelLayout& layout = parallel_.layout();
  const int64_t steps = (config_.train.eval_steps + layout.dp - 1) / layout.dp;
  model_->eval();
  for (const model::Moe& layer : model_->moe_layers()) layer->gate->take_eval_stats();  // sums start at zero
  const auto evaluate_split = [&](const std::shared_ptr<const data::IndexedDataset>& dataset,
                                  data::SamplerOptions options) {
    options.rank = layout.dp_rank;
    options.world_size = layout.dp;
    EvalResult result = evaluate(
        [&](const data::Batch& batch) { return pipeline_forward(*model_, parallel_, batch, config_.train.precision); },
        dataset, options, steps);
    Tensor sums = torch::tensor({layout.last_stage() ? result.loss_sum : 0.0,
                                 layout.last_stage() ? static_cast<double>(result.tokens) : 0.0},
                                torch::kDouble);
    parallel_.world_group.all_reduce_sum(sums);
    result.loss_sum = sums[0].item<double>();
    result.tokens = static_cast<int64_t>(sums[1].item<double>());
    result.routed_pairs_LE = step_->router_balancing().world_rows(result.routed_pairs_LE, config_.moe.num_experts, torch::kLong);
    result.finish();
    return result;
  };
  // Every router's eval statistics since the last call, [MoE layers of this stage, (entropy sum,
  // tokens)] fp64, placed at the model's MoE layers (a collective: every rank takes part).
  const auto router_statistics = [&] {
    const std::vector<model::Moe> layers = model_->moe_layers();
    Tensor stage_L2;
    if (!layers.empty()) {
      stage_L2 = torch::zeros({static_cast<int64_t>(layers.size()), 2}, torch::kDouble);
      for (size_t l = 0; l < layers.size(); ++l) {
        const model::RouterEvalStats stats = layers[l]->gate->take_eval_stats();
        stage_L2[static_cast<int64_t>(l)][0] = stats.entropy_sum;
        stage_L2[static_cast<int64_t>(l)][1] = static_cast<double>(stats.tokens);
      }
    }
    return step_->router_balancing().world_rows(stage_L2, 2, torch::kDouble);
  };
  EvalResult result;
  Tensor router_L2;
  if (data_->valid()) {
    result = evaluate_split(data_->valid()->dataset, data_->valid()->options);
    router_L2 = router_statistics();
  }
  // data.blend entries with a valid_prefix: a loss each; without data.valid_prefix the headline
  // loss is their blend-weighted mean (docs/data.md, "Blends").
  std::vector<EvalResult> sources;
  std::vector<double> source_weights;
  for (const ValidationSplit& split : data_->blend_valid()) {
    sources.push_back(evaluate_split(split.dataset, split.options));
    source_weights.push_back(split.weight);
  }
  if (!data_->valid()) {
    result = blend_eval_result(sources, source_weights);
    router_L2 = router_statistics();
  }
  model_->train();
  if (!is_logging_rank()) return result;
  nlohmann::ordered_json line = eval_line(progress_.step, result, router_L2);
  std::string per_source;
  if (!sources.empty()) {
    std::vector<std::string> names;
    for (const ValidationSplit& split : data_->blend_valid()) names.push_back(split.name);
    line["sources"] = eval_sources_json(names, sources);
    for (size_t i = 0; i < sources.size(); ++i) {
      per_source += fmt::format("{}{} {:.4f}", i ? ", " : " | sources: ", names[i], sources[i].loss);
    }
  }
  metrics_->write(line);
  info(fmt::format("eval step {} | valid loss {:.4f} | perplexity {:.2f} | {} tokens{}", progress_.step, result.loss,
                   result.perplexity, result.tokens, per_source));
  return result;
}

fs::path Trainer::save() {
  data_->save(progress_);
  const fs::path dir = checkpoints_->save(progress_, *model_, *optimizer_);
  info("checkpoint " + dir.string());
  return dir;
}

TrainSummary Trainer::run() {
  const config::TrainConfig& train = config_.train;
  TrainSummary summary;
  summary.first_step = summary.last_step = progress_.step;
  const int64_t stop_step = options_.exit_after_steps > 0
                                ? std::min(train.max_steps, progress_.step + options_.exit_after_steps)
                                : train.max_steps;
  if (progress_.step >= train.max_steps) {
    info("run already complete: step " + std::to_string(progress_.step) + " of " + std::to_string(train.max_steps));
    if (auto latest = checkpoint::find_latest_checkpoint(options_.run_dir / config_.checkpoint.dir)) {
      summary.last_checkpoint = *latest;
    }
    return summary;
  }
  const int64_t tokens_per_step = train.global_batch_size * train.seq_length;
  const model::ModelSize size = model::model_size(config_.model, config_.moe, train.seq_length);
  info(fmt::format("training {} parameters ({} active) on {} ({} threads) | {} tokens/step, {} micro-batches "
                   "| steps {}..{} of {} | peak {:.0f} GFLOP/s{}",
                   size.total_parameters, size.active_parameters, device_.str(), at::get_num_threads(),
                   tokens_per_step, train.global_batch_size / train.micro_batch_size, progress_.step + 1, stop_step,
                   train.max_steps, peak_flops_ / 1e9, config_.log.peak_tflops > 0 ? " (config)" : " (measured)"));
  if (parallel_.distributed()) {
    const parallel::ParallelLayout& layout = parallel_.layout();
    info(fmt::format("rank {} of {} ({}): data-parallel {} of {}, pipeline stage {} of {} (layers {}..{}), "
                     "expert-parallel {} of {}, {} micro-batches per step on this rank, schedule {}, optimizer {}",
                     parallel_.world().rank, parallel_.world().world_size, parallel_.world().launcher, layout.dp_rank,
                     layout.dp, layout.stage, layout.pp, model_->stage.first_layer, model_->stage.end_layer - 1,
                     layout.ep_rank, layout.ep, step_->micro_batches_per_rank(),
                     config::to_string(config_.parallel.pipeline_schedule),
                     optimizer_->sharded() ? "sharded over data-parallel ranks" : "replicated"));
  }

  auto redraw_plots = [&] {
    if (!plots_enabled_ || !is_logging_rank()) return;
    const std::string problem = render_plots(options_.run_dir);
    if (!problem.empty()) {
      console_->warn(problem);
      plots_enabled_ = false;  // warn once
    }
  };
  const bool evaluating = data_->has_validation();
  if (evaluating && progress_.step == 0) {
    summary.first_eval = evaluate_and_log();  // the baseline every later evaluation is read against
    summary.last_eval = summary.first_eval;
  }

  ProgressBar bar(progress_.step, train.max_steps, config_.log.progress && is_logging_rank());
  StepInterval interval;
  bool state_bytes_logged = false;
  const std::shared_ptr<const parallel::ExpertParallelTimes> expert_times = optimizer_->experts().times;
  parallel::ExpertParallelTimes expert_step_times;
  double step_seconds = 0.0;
  while (progress_.step < stop_step) {
    const auto start = std::chrono::steady_clock::now();
    const parallel::ExpertParallelTimes expert_times_before = expert_times ? *expert_times : parallel::ExpertParallelTimes{};
    const StepResult result = step_->run(progress_.step, [&] { return data_->next_batch(); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (expert_times) {  // training steps only, not the evaluations between them
      expert_step_times.all_to_all += expert_times->all_to_all - expert_times_before.all_to_all;
      expert_step_times.experts_forward += expert_times->experts_forward - expert_times_before.experts_forward;
      expert_step_times.experts_backward += expert_times->experts_backward - expert_times_before.experts_backward;
      step_seconds += seconds;
    }
    if (result.skipped) console_->warn(result.nonfinite);
    if (!state_bytes_logged && !result.skipped) {
      log_memory_per_rank();
      state_bytes_logged = true;
    }
    ++progress_.step;
    progress_.tokens_seen += tokens_per_step;
    interval.add(result, seconds, tokens_per_step);
    summary.last_loss = result.loss;
    bar.update(progress_.step, result.loss, static_cast<double>(tokens_per_step) / seconds);

    const int64_t step = progress_.step;
    const bool last = step == train.max_steps;
    if (step % config_.log.interval == 0 || last || step == stop_step) {
      const StepInterval::Line line =
          interval.take(step, train.max_steps, result, progress_.tokens_seen, flops_per_token_, peak_flops_,
                        parallel_.world().world_size, parallel_.layout().pp > 1, bar.eta(step));
      if (metrics_) metrics_->write(line.json);
      (bar.enabled() ? file_ : console_)->info(line.text);
    }
    const bool eval_now = evaluating && ((train.eval_interval > 0 && step % train.eval_interval == 0) || last);
    const bool save_now =
        (config_.checkpoint.interval > 0 && step % config_.checkpoint.interval == 0) || last || step == stop_step;
    if (eval_now || save_now) bar.clear();
    if (eval_now) {
      summary.last_eval = evaluate_and_log();
      if (!summary.first_eval) summary.first_eval = summary.last_eval;
    }
    if (save_now) summary.last_checkpoint = save();
    if (eval_now || save_now) redraw_plots();
  }
  bar.finish();
  summary.last_step = progress_.step;
  if (expert_times && progress_.step > summary.first_step) {
    const double steps = static_cast<double>(progress_.step - summary.first_step);
    console_->info(fmt::format(
        "expert parallelism on rank {}, per step: all-to-all {:.1f} ms, experts forward {:.1f} ms + backward {:.1f} "
        "ms, step {:.1f} ms",
        parallel_.world().rank, 1e3 * expert_step_times.all_to_all / steps, 1e3 * expert_step_times.experts_forward / steps,
        1e3 * expert_step_times.experts_backward / steps, 1e3 * step_seconds / steps));
  }
  if (progress_.step < train.max_steps) {
    info("stopped after " + std::to_string(progress_.step - summary.first_step) + " steps (--exit-after-steps); rerun "
         "the same command to continue from " + summary.last_checkpoint.string());
  }
  return summary;
}

}  // namespace yuanmoe::train
