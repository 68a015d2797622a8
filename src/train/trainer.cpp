#include "yuanmoe/train/trainer.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <set>

#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/data/prepare.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/param_count.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/lr_schedule.h"
#include "yuanmoe/train/mfu.h"
#include "yuanmoe/train/optimizer.h"
#include "yuanmoe/train/plots.h"
#include "yuanmoe/train/precision.h"

namespace yuanmoe::train {

namespace {

using ordered_json = nlohmann::ordered_json;

ordered_json ordered(const nlohmann::json& j) { return ordered_json::parse(j.dump()); }

/// Keys that may differ between a checkpoint and the config that loads it: training knobs, not
/// the function the weights compute. A fine-tune may also move to a longer context (§5 of SPEC).
bool may_differ(const std::string& key, bool fine_tune) {
  static const std::set<std::string> training_knobs{
      "model.init_std",          "model.attention_dropout", "moe.aux_loss_coeff",
      "moe.z_loss_coeff",        "moe.bias_balancing_rate", "moe.relu_l1_init",
      "moe.relu_l1_alpha",       "moe.capacity_factor"};
  static const std::set<std::string> context_keys{"model.rope_base", "model.rope_tables", "model.max_seq_length"};
  return training_knobs.count(key) > 0 || (fine_tune && context_keys.count(key) > 0);
}

/// Every model / moe key whose value differs between the checkpoint's config and `current`.
std::vector<std::string> differing_keys(const ordered_json& saved, const nlohmann::json& current,
                                        const std::vector<std::string>& sections) {
  std::vector<std::string> keys;
  for (const auto& section : sections) {
    if (!current.contains(section)) continue;
    for (const auto& [key, value] : current.at(section).items()) {
      const ordered_json saved_value = saved.contains(section) && saved.at(section).contains(key)
                                           ? saved.at(section).at(key)
                                           : ordered_json();
      if (saved_value.dump() != ordered(value).dump()) keys.push_back(section + "." + key);
    }
  }
  return keys;
}

void check_architecture(const ordered_json& saved, const config::RunConfig& config,
                        const fs::path& dir, bool fine_tune) {
  const nlohmann::json current = config::to_json(config);
  // Keys added after the checkpoint was written compare as their defaults.
  const ordered_json saved_resolved = ordered(config::to_json(config::parse_config(nlohmann::json::parse(saved.dump())).config));
  std::string mismatches;
  for (const auto& key : differing_keys(saved_resolved, current, {"model", "moe"})) {
    if (may_differ(key, fine_tune)) continue;
    const auto dot = key.find('.');
    const std::string section = key.substr(0, dot), name = key.substr(dot + 1);
    mismatches += (mismatches.empty() ? "" : "; ") + key + " is " + saved_resolved.at(section).value(name, ordered_json()).dump() +
                  " in the checkpoint, " + current.at(section).at(name).dump() + " in the config";
  }
  if (!mismatches.empty()) {
    throw std::runtime_error(dir.string() + ": architecture differs: " + mismatches +
                             (fine_tune ? "" : " (use a new run dir, or train.init_from to fine-tune)"));
  }
}

ordered_json load_json_array(const Tensor& load_LE) {
  ordered_json rows = ordered_json::array();
  const Tensor rounded = (load_LE * 1e4).round() / 1e4;
  for (int64_t l = 0; l < rounded.size(0); ++l) {
    const Tensor row = rounded[l].contiguous();
    rows.push_back(std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + row.numel()));
  }
  return rows;
}

}  // namespace

Trainer::Trainer(const config::RunConfig& config, TrainerOptions options)
    : config_(config), options_(std::move(options)), device_(training_device()) {
  const config::TrainConfig& train = config_.train;
  fs::create_directories(options_.run_dir);
  auto file_sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>((options_.run_dir / "train.log").string());
  auto console_sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  console_ = std::make_shared<spdlog::logger>("train", spdlog::sinks_init_list{console_sink, file_sink});
  file_ = std::make_shared<spdlog::logger>("train.file", file_sink);
  for (auto& logger : {console_, file_}) {
    logger->set_pattern("[%Y-%m-%d %H:%M:%S] %v");
    logger->flush_on(spdlog::level::info);
  }
  std::ofstream(options_.run_dir / "config.resolved.json") << config::to_json(config_).dump(2) << "\n";

  if (config_.data.train_prefix.empty()) {
    throw config::ConfigError("config", {{"data.train_prefix", "required for training"}});
  }
  auto train_dataset = std::make_shared<const data::IndexedDataset>(config_.data.train_prefix);
  if (auto meta = data::load_dataset_meta(config_.data.train_prefix); meta && meta->vocab_size > config_.model.vocab_size) {
    throw config::ConfigError("config", {{"model.vocab_size", "is " + std::to_string(config_.model.vocab_size) +
                                                                  ", smaller than the vocabulary of " +
                                                                  config_.data.train_prefix + " (" +
                                                                  std::to_string(meta->vocab_size) + ")"}});
  }
  const data::SamplerOptions train_options = sampler_options(config_, config_.data.train_prefix);
  if (train_options.reset_position_ids && train_options.eod_id < 0) {
    throw config::ConfigError("config", {{"data.eod_id", "unknown: set it, or prepare the data with yuanmoe "
                                                         "prepare-data (its .meta.json names it), or set "
                                                         "data.reset_position_ids to false"}});
  }
  train_sampler_ = std::make_unique<data::GptSampler>(train_dataset, train_options);
  if (!config_.data.valid_prefix.empty()) {
    valid_dataset_ = std::make_shared<const data::IndexedDataset>(config_.data.valid_prefix);
    valid_options_ = train_options;  // the train split's EOD: both come from one tokenizer
  }
  micro_batches_per_step_ = train.global_batch_size / train.micro_batch_size;

  // Same seed, same initial weights (init.h draws in registration order).
  torch::manual_seed(static_cast<uint64_t>(train.seed));
  model_ = model::Transformer(config_.model, config_.moe);
  model::init_weights(*model_, config_.model);
  model_->recompute = train.recompute;
  model_->to(device_);
  model_->train();
  parameters_ = model_->parameters();
  optimizer_ = make_optimizer(*model_, train);

  flops_per_token_ = training_flops_per_token(config_);
  peak_flops_ = config_.log.peak_tflops > 0
                    ? config_.log.peak_tflops * 1e12
                    : measure_peak_flops(device_, train.precision == config::Precision::kBf16 ? torch::kBFloat16
                                                                                              : torch::kFloat);
  plots_enabled_ = config_.log.plots;
  resume_or_initialise();
  metrics_ = std::make_unique<MetricsLog>(options_.run_dir / "metrics.jsonl", step_);
}

void Trainer::resume_or_initialise() {
  const fs::path checkpoints_dir = options_.run_dir / config_.checkpoint.dir;
  if (auto latest = checkpoint::find_latest_checkpoint(checkpoints_dir)) {
    checkpoint::Checkpoint saved = checkpoint::load_checkpoint(*latest);
    check_architecture(saved.config, config_, *latest, /*fine_tune=*/false);
    for (const auto& key : differing_keys(saved.config, config::to_json(config_), {"train", "data", "checkpoint"})) {
      info("note: " + key + " differs from the checkpoint's config; using the new value");
    }
    checkpoint::load_model_state(*model_, saved.model, (*latest / "model.safetensors").string());
    load_optimizer_state_by_name(*model_, *optimizer_, saved.optimizer, (*latest / "optimizer.safetensors").string());
    for (const auto& [name, state] : saved.rng) {
      if (name != "cpu") continue;
      at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle: shares the state
      generator.set_state(state);
    }
    train_sampler_->set_state(saved.progress.sampler);
    step_ = saved.progress.step;
    tokens_seen_ = saved.progress.tokens_seen;
    info("resumed from " + latest->string() + " at step " + std::to_string(step_));
    return;
  }
  if (!config_.train.init_from.empty()) {
    const fs::path dir = checkpoint::resolve_checkpoint_dir(config_.train.init_from);
    const checkpoint::Checkpoint saved = checkpoint::load_checkpoint(dir, checkpoint::LoadParts::kModelOnly);
    check_architecture(saved.config, config_, dir, /*fine_tune=*/true);
    checkpoint::load_model_state(*model_, saved.model, (dir / "model.safetensors").string());
    info("fine-tuning from " + dir.string() + " (step " + std::to_string(saved.progress.step) +
         "): weights loaded; optimizer, schedule and data start fresh at seq_length " +
         std::to_string(config_.train.seq_length) + ", rope_base " + std::to_string(config_.model.rope_base));
  }
}

Trainer::StepResult Trainer::train_step() {
  StepResult result;
  result.lr = lr_at(step_, config_.train);
  set_learning_rate(*optimizer_, result.lr);
  model_->zero_grad(/*set_to_none=*/true);

  // Each micro-batch's loss is scaled by 1/M, so the accumulated gradient is that of the mean
  // over the global batch (all micro-batches hold the same number of tokens).
  const double scale = 1.0 / static_cast<double>(micro_batches_per_step_);
  Tensor lm_sum = torch::zeros({}, torch::dtype(torch::kDouble).device(device_));
  Tensor aux_sum = torch::zeros({}, torch::dtype(torch::kDouble).device(device_));
  for (int64_t micro = 0; micro < micro_batches_per_step_; ++micro) {
    const data::Batch batch = train_sampler_->next_batch();
    model::ModelOutput out;
    {
      AutocastScope autocast(config_.train.precision, device_);
      out = model_->forward(batch.tokens.to(device_), batch.position_ids.to(device_));
    }
    const Tensor lm_loss = language_model_loss(out.out, batch.labels.to(device_));
    Tensor loss = lm_loss;
    if (out.aux_loss.defined()) {
      loss = loss + out.aux_loss.to(lm_loss.scalar_type());
      aux_sum += out.aux_loss.detach().to(torch::kDouble);
    }
    (loss * scale).backward();
    lm_sum += lm_loss.detach().to(torch::kDouble);
    if (out.expert_load_LE.defined()) {
      result.pairs_LE = result.pairs_LE.defined() ? result.pairs_LE + out.expert_load_LE : out.expert_load_LE;
    }
  }
  if (result.pairs_LE.defined()) result.pairs_LE = result.pairs_LE.to(torch::kCPU);  // once per step
  result.loss = lm_sum.item<double>() * scale;
  result.aux_loss = aux_sum.item<double>() * scale;
  if (!std::isfinite(result.loss) || !std::isfinite(result.aux_loss)) {
    throw std::runtime_error("step " + std::to_string(step_ + 1) + ": loss is " + std::to_string(result.loss) +
                             " (aux " + std::to_string(result.aux_loss) +
                             "); training diverged: lower train.lr or raise train.warmup_steps");
  }
  result.grad_norm = clip_gradients(parameters_, config_.train.grad_clip);
  optimizer_->step();
  const int64_t tokens = config_.train.global_batch_size * config_.train.seq_length;
  update_routers(result.pairs_LE, tokens);
  ++step_;
  tokens_seen_ += tokens;
  return result;
}

void Trainer::update_routers(const Tensor& pairs_LE, int64_t tokens) {
  const std::vector<model::Moe> layers = model_->moe_layers();
  if (layers.empty() || !pairs_LE.defined()) return;
  model::RouterStepStats stats;
  stats.tokens = tokens;
  // ReMoE's L1 coefficient follows the sparsity of all layers together (routers.md §ReMoE).
  stats.active_fraction_all_layers =
      pairs_LE.sum().item<double>() / static_cast<double>(tokens * config_.moe.num_experts * pairs_LE.size(0));
  for (size_t l = 0; l < layers.size(); ++l) {
    stats.pairs_per_expert_E = pairs_LE[static_cast<int64_t>(l)].to(device_);
    layers[l]->gate->update_after_step(stats);
  }
}

EvalResult Trainer::run_evaluation() {
  const EvalResult result = evaluate(*model_, valid_dataset_, valid_options_, config_.train.eval_steps,
                                     config_.train.precision);
  ordered_json line{{"step", step_},           {"split", "valid"},       {"loss", result.loss},
                    {"perplexity", result.perplexity}, {"tokens", result.tokens}};
  if (result.expert_load_LE.defined()) line["expert_load"] = load_json_array(result.expert_load_LE);
  metrics_->write(line);
  info(fmt::format("eval step {} | valid loss {:.4f} | perplexity {:.2f} | {} tokens", step_, result.loss,
                   result.perplexity, result.tokens));
  return result;
}

fs::path Trainer::save() {
  checkpoint::Checkpoint ck;
  ck.progress = {step_, tokens_seen_, train_sampler_->state()};
  ck.config = ordered(config::to_json(config_));
  ck.layout = {{"pipeline_parallel_size", 1}, {"data_parallel_size", 1}};
  ck.model = checkpoint::model_state(*model_);
  ck.optimizer = optimizer_state_by_name(*model_, *optimizer_);
  ck.rng = {{"cpu", at::detail::getDefaultCPUGenerator().get_state()}};
  if (!config_.data.tokenizer.empty() && fs::exists(config_.data.tokenizer)) ck.tokenizer = config_.data.tokenizer;
  const fs::path dir =
      checkpoint::save_checkpoint(options_.run_dir / config_.checkpoint.dir, ck, config_.checkpoint.keep_last);
  info("checkpoint " + dir.string());
  return dir;
}

void Trainer::info(const std::string& message) {
  console_->info(message);
}

TrainSummary Trainer::run() {
  const config::TrainConfig& train = config_.train;
  TrainSummary summary;
  summary.first_step = summary.last_step = step_;
  const int64_t stop_step = options_.exit_after_steps > 0
                                ? std::min(train.max_steps, step_ + options_.exit_after_steps)
                                : train.max_steps;
  if (step_ >= train.max_steps) {
    info("run already complete: step " + std::to_string(step_) + " of " + std::to_string(train.max_steps));
    if (auto latest = checkpoint::find_latest_checkpoint(options_.run_dir / config_.checkpoint.dir)) {
      summary.last_checkpoint = *latest;
    }
    return summary;
  }
  const model::ModelSize size = model::model_size(config_.model, config_.moe, train.seq_length);
  info(fmt::format("training {} parameters ({} active) on {} ({} threads) | {} tokens/step, {} micro-batches "
                   "| steps {}..{} of {} | peak {:.0f} GFLOP/s{}",
                   size.total_parameters, size.active_parameters, device_.str(), at::get_num_threads(),
                   train.global_batch_size * train.seq_length, micro_batches_per_step_, step_ + 1, stop_step,
                   train.max_steps, peak_flops_ / 1e9, config_.log.peak_tflops > 0 ? " (config)" : " (measured)"));

  auto redraw_plots = [&] {
    if (!plots_enabled_) return;
    const std::string problem = render_plots(options_.run_dir);
    if (!problem.empty()) {
      console_->warn(problem);
      plots_enabled_ = false;  // warn once
    }
  };
  const bool evaluating = valid_dataset_ != nullptr;
  if (evaluating && step_ == 0) {
    summary.first_eval = run_evaluation();  // the baseline every later evaluation is read against
    summary.last_eval = summary.first_eval;
  }

  ProgressBar bar(step_, train.max_steps, config_.log.progress);
  double interval_seconds = 0.0;
  int64_t interval_tokens = 0;
  Tensor interval_pairs_LE;
  while (step_ < stop_step) {
    const auto start = std::chrono::steady_clock::now();
    const StepResult result = train_step();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const int64_t tokens = train.global_batch_size * train.seq_length;
    interval_seconds += seconds;
    interval_tokens += tokens;
    if (result.pairs_LE.defined()) {
      interval_pairs_LE = interval_pairs_LE.defined() ? interval_pairs_LE + result.pairs_LE : result.pairs_LE;
    }
    summary.last_loss = result.loss;
    bar.update(step_, result.loss, static_cast<double>(tokens) / seconds);

    const bool last = step_ == train.max_steps;
    if (step_ % config_.log.interval == 0 || last || step_ == stop_step) {
      const double tokens_per_s = static_cast<double>(interval_tokens) / interval_seconds;
      ordered_json line{{"step", step_},
                        {"loss", result.loss},
                        {"aux_loss", result.aux_loss},
                        {"lr", result.lr},
                        {"grad_norm", result.grad_norm},
                        {"tokens_per_s", tokens_per_s},
                        {"tokens_seen", tokens_seen_}};
      const double mfu = tokens_per_s * flops_per_token_ / peak_flops_;
      line["mfu"] = mfu;
      if (interval_pairs_LE.defined()) line["expert_load"] = load_json_array(expert_load_fractions(interval_pairs_LE));
      metrics_->write(line);
      const std::string text = fmt::format(
          "step {}/{} | loss {:.4f} | aux {:.4f} | lr {:.3e} | grad_norm {:.3f} | {} tok/s | mfu {:.1f}% | ETA {}",
          step_, train.max_steps, result.loss, result.aux_loss, result.lr, result.grad_norm,
          human_count(tokens_per_s), 100.0 * mfu, bar.eta(step_));
      if (bar.enabled()) {
        file_->info(text);
      } else {
        console_->info(text);
      }
      interval_seconds = 0.0;
      interval_tokens = 0;
      interval_pairs_LE = Tensor();
    }
    const bool eval_now = evaluating && ((train.eval_interval > 0 && step_ % train.eval_interval == 0) || last);
    const bool save_now =
        (config_.checkpoint.interval > 0 && step_ % config_.checkpoint.interval == 0) || last || step_ == stop_step;
    if (eval_now || save_now) bar.clear();
    if (eval_now) {
      summary.last_eval = run_evaluation();
      if (!summary.first_eval) summary.first_eval = summary.last_eval;
    }
    if (save_now) summary.last_checkpoint = save();
    if (eval_now || save_now) redraw_plots();
  }
  bar.finish();
  summary.last_step = step_;
  if (step_ < train.max_steps) {
    info("stopped after " + std::to_string(step_ - summary.first_step) + " steps (--exit-after-steps); rerun the "
         "same command to continue from " + summary.last_checkpoint.string());
  }
  return summary;
}

}  // namespace yuanmoe::train
