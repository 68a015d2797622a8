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
#include "yuanmoe/model/block.h"
#include "yuanmoe/train/gradient_sync.h"
#include "yuanmoe/train/optimizer.h"
#include "yuanmoe/train/pipeline.h"
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
      "model.init_std",          "model.attention_dropout", "model.attention", "moe.aux_loss_coeff",
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

/// The entries of a merged checkpoint state that belong to `model` (this stage): parameter and
/// buffer names, or "{param}/..." optimizer entries.
checkpoint::NamedTensors for_stage(const checkpoint::NamedTensors& all, const torch::nn::Module& model) {
  std::set<std::string> names;
  for (const auto& item : model.named_parameters()) names.insert(item.key());
  for (const auto& item : model.named_buffers()) names.insert(item.key());
  checkpoint::NamedTensors out;
  for (const auto& [name, t] : all) {
    if (names.count(name.substr(0, name.find('/')))) out.emplace_back(name, t);
  }
  return out;
}

/// What this rank writes into a checkpoint: every stage's dp rank 0 writes its stage's tensors,
/// without the last stage's copy of a tied embedding (the first stage's is the one).
checkpoint::NamedTensors without_tied_copy(const checkpoint::NamedTensors& state, const model::StageSpec& stage) {
  if (stage.has_embedding) return state;
  checkpoint::NamedTensors out;
  for (const auto& [name, t] : state) {
    if (name.rfind("embed_tokens.", 0) != 0) out.emplace_back(name, t);
  }
  return out;
}

/// A 1-D tensor as a JSON array of doubles rounded to 1e-4 (shares, entropies, counts per token).
ordered_json json_vector(const Tensor& values_L) {
  const Tensor rounded = ((values_L.to(torch::kDouble) * 1e4).round() / 1e4).contiguous();
  return std::vector<double>(rounded.data_ptr<double>(), rounded.data_ptr<double>() + rounded.numel());
}

ordered_json load_json_array(const Tensor& load_LE) {
  ordered_json rows = ordered_json::array();
  for (int64_t l = 0; l < load_LE.size(0); ++l) rows.push_back(json_vector(load_LE[l]));
  return rows;
}

}  // namespace

model::StageSpec balanced_stage(int64_t num_layers, int64_t stages, int64_t stage, int64_t first_layers,
                                int64_t last_layers) {
  std::vector<int64_t> sizes(static_cast<size_t>(stages), 0);
  if (stages > 1 && first_layers > 0) sizes.front() = first_layers;
  if (stages > 1 && last_layers > 0) sizes.back() = last_layers;
  std::vector<size_t> free_stages;
  for (size_t s = 0; s < sizes.size(); ++s) {
    if (sizes[s] == 0) free_stages.push_back(s);
  }
  int64_t rest = num_layers;
  for (const int64_t size : sizes) rest -= size;
  const int64_t n = static_cast<int64_t>(free_stages.size());
  for (int64_t i = 0; i < n; ++i) sizes[free_stages[static_cast<size_t>(i)]] = rest / n + (i < rest % n ? 1 : 0);
  int64_t first = 0;
  for (int64_t s = 0; s < stage; ++s) first += sizes[static_cast<size_t>(s)];
  return {first, first + sizes[static_cast<size_t>(stage)], stage == 0, stage == stages - 1};
}

Trainer::Trainer(const config::RunConfig& config, TrainerOptions options)
    : config_(config), options_(std::move(options)), parallel_(options_.parallel), device_(training_device(parallel_.world().local_rank)) {
  const config::TrainConfig& train = config_.train;
  const parallel::ParallelLayout& layout = parallel_.layout();
  fs::create_directories(options_.run_dir);
  // Rank 0 talks to the terminal and train.log; every other rank keeps its own log file.
  const std::string log_name =
      is_logging_rank() ? "train.log" : "train.rank" + std::to_string(parallel_.world().rank) + ".log";
  auto file_sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>((options_.run_dir / log_name).string());
  auto console_sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  console_ = is_logging_rank()
                 ? std::make_shared<spdlog::logger>("train", spdlog::sinks_init_list{console_sink, file_sink})
                 : std::make_shared<spdlog::logger>("train", file_sink);
  file_ = std::make_shared<spdlog::logger>("train.file", file_sink);
  for (auto& logger : {console_, file_}) {
    logger->set_pattern("[%Y-%m-%d %H:%M:%S] %v");
    logger->flush_on(spdlog::level::info);
  }
  if (is_logging_rank()) {
    std::ofstream(options_.run_dir / "config.resolved.json") << config::to_json(config_).dump(2) << "\n";
  }
  if (layout.pp != config_.parallel.pipeline_parallel_size) {
    throw std::logic_error("the parallel context was built for another pipeline size");
  }
  if (train.global_batch_size % (train.micro_batch_size * layout.dp) != 0) {
    throw config::ConfigError("config", {{"train.global_batch_size",
                                          "must be divisible by train.micro_batch_size x data-parallel size (" +
                                              std::to_string(train.micro_batch_size) + " x " +
                                              std::to_string(layout.dp) + "), got " +
                                              std::to_string(train.global_batch_size)}});
  }
  micro_batches_per_global_batch_ = train.global_batch_size / train.micro_batch_size;
  micro_batches_per_step_ = micro_batches_per_global_batch_ / layout.dp;
  if (config_.parallel.num_microbatches && *config_.parallel.num_microbatches != micro_batches_per_step_) {
    throw config::ConfigError("config", {{"parallel.num_microbatches",
                                          "is " + std::to_string(*config_.parallel.num_microbatches) +
                                              ", but global_batch_size / (micro_batch_size x data-parallel size) = " +
                                              std::to_string(micro_batches_per_step_)}});
  }

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
  data::SamplerOptions train_options = sampler_options(config_, config_.data.train_prefix);
  train_options.rank = layout.dp_rank;  // the sampler state is global: any dp degree resumes it
  train_options.world_size = layout.dp;
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

  // Each parameter's initial value depends only on the seed and its name (init.h), so every
  // layout starts from the same model. Other randomness (dropout) differs per rank.
  torch::manual_seed(static_cast<uint64_t>(train.seed + parallel_.world().rank));
  stage_ = balanced_stage(config_.model.num_layers, layout.pp, layout.stage, config_.parallel.first_stage_layers,
                         config_.parallel.last_stage_layers);
  for (int64_t l = 0; l < config_.model.num_layers; ++l) {
    if (!model::is_moe_layer(config_.moe, l)) continue;
    ++total_moe_layers_;
    if (l < stage_.first_layer) ++moe_layers_before_stage_;
  }
  model_ = model::Transformer(config_.model, config_.moe, stage_);
  model::init_weights(*model_, config_.model, static_cast<uint64_t>(train.seed));
  model_->recompute = train.recompute;
  model_->to(device_);
  model_->train();
  parameters_ = model_->parameters();
  optimizer_ = make_optimizer(*model_, train);

  flops_per_token_ = training_flops_per_token(config_);
  // Only rank 0 reports MFU; the peak is per process.
  peak_flops_ = config_.log.peak_tflops > 0 ? config_.log.peak_tflops * 1e12
                : !is_logging_rank()        ? 0.0
                                            : measure_peak_flops(device_, train.precision == config::Precision::kBf16
                                                                              ? torch::kBFloat16
                                                                              : torch::kFloat);
  plots_enabled_ = config_.log.plots;
  resume_or_initialise();
  if (is_logging_rank()) metrics_ = std::make_unique<MetricsLog>(options_.run_dir / "metrics.jsonl", step_);
}

void Trainer::resume_or_initialise() {
  const fs::path checkpoints_dir = options_.run_dir / config_.checkpoint.dir;
  if (auto latest = checkpoint::find_latest_checkpoint(checkpoints_dir)) {
    checkpoint::Checkpoint saved = checkpoint::load_checkpoint(*latest);
    check_architecture(saved.config, config_, *latest, /*fine_tune=*/false);
    for (const auto& key : differing_keys(saved.config, config::to_json(config_), {"train", "data", "checkpoint"})) {
      info("note: " + key + " differs from the checkpoint's config; using the new value");
    }
    checkpoint::load_model_state(*model_, for_stage(saved.model, *model_), latest->string());
    load_optimizer_state_by_name(*model_, *optimizer_, for_stage(saved.optimizer, *model_), latest->string());
    // Same layout: each rank continues its own random stream. Another layout reseeds (dropout
    // masks then differ from an uninterrupted run, as they would anyway).
    const std::string rng_name = parallel_.distributed() ? "rank" + std::to_string(parallel_.world().rank) + "/cpu" : "cpu";
    const bool same_layout = saved.layout == ordered_json{{"pipeline_parallel_size", parallel_.layout().pp},
                                                          {"data_parallel_size", parallel_.layout().dp}};
    for (const auto& [name, state] : saved.rng) {
      if (name != rng_name || !same_layout) continue;
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
    const auto [dir, step] = load_init_from(*model_, config_);
    info("fine-tuning from " + dir.string() + " (step " + std::to_string(step) +
         "): weights loaded; optimizer, schedule and data start fresh at seq_length " +
         std::to_string(config_.train.seq_length) + ", rope_base " + std::to_string(config_.model.rope_base));
  }
}

std::pair<fs::path, int64_t> load_init_from(torch::nn::Module& model, const config::RunConfig& config) {
  const fs::path dir = checkpoint::resolve_checkpoint_dir(config.train.init_from);
  const checkpoint::Checkpoint saved = checkpoint::load_checkpoint(dir, checkpoint::LoadParts::kModelOnly);
  check_architecture(saved.config, config, dir, /*fine_tune=*/true);
  checkpoint::load_model_state(model, for_stage(saved.model, model), dir.string());
  return {dir, saved.progress.step};
}

Trainer::StepResult Trainer::train_step() {
  StepResult result;
  result.lr = lr_at(step_, config_.train);
  set_learning_rate(*optimizer_, result.lr);
  model_->zero_grad(/*set_to_none=*/true);

  // Each micro-batch's loss is scaled by 1/m (m: this rank's micro-batches) and the data-parallel
  // ranks average their gradients: the gradient of the mean over the global batch (Megatron).
  PipelineStepOptions options;
  options.schedule = config_.parallel.pipeline_schedule;
  options.micro_batches = micro_batches_per_step_;
  options.loss_scale = 1.0 / static_cast<double>(micro_batches_per_step_);
  options.precision = config_.train.precision;
  const PipelineStepResult step =
      run_pipeline_step(*model_, parallel_, options, [&] { return train_sampler_->next_batch(); });
  synchronize_gradients(parameters_,
                        parallel_.embedding.size() > 1 ? model_->embed_tokens->weight : Tensor(), parallel_);

  // Losses live on the last stages, router terms on every stage: one sum over the world. The
  // pipeline's waiting and total times give its measured bubble.
  Tensor sums = torch::tensor({step.lm_loss_sum, step.aux_loss_sum, step.wait_seconds, step.wall_seconds}, torch::kDouble);
  parallel_.world_group.all_reduce_sum(sums);
  result.pipeline_bubble = sums[3].item<double>() > 0 ? sums[2].item<double>() / sums[3].item<double>() : 0.0;
  result.loss = sums[0].item<double>() / static_cast<double>(micro_batches_per_global_batch_);
  result.aux_loss = sums[1].item<double>() / static_cast<double>(micro_batches_per_global_batch_);
  result.pairs_LE = global_expert_counts(step.pairs_LE);
  if (options_.inject_nonfinite_steps.count(step_ + 1) > 0) {
    torch::NoGradGuard no_grad;
    for (auto& parameter : parameters_) {
      if (parameter.grad().defined()) parameter.mutable_grad().fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }

  // Global gradient norm: this stage's parameters (the tied copy counted once) over the pipeline;
  // data-parallel ranks hold the same gradients after synchronize_gradients.
  std::vector<Tensor> counted;
  for (const auto& item : model_->named_parameters()) {
    if (!stage_.has_embedding && item.key().rfind("embed_tokens.", 0) == 0) continue;
    counted.push_back(item.value());
  }
  result.grad_norm = global_gradient_norm(counted, parallel_);
  const int64_t tokens = config_.train.global_batch_size * config_.train.seq_length;

  // Loss and norm are reduced over the world, so every rank takes the same decision here, before
  // anything of the step is applied.
  if (!std::isfinite(result.loss) || !std::isfinite(result.aux_loss) || !std::isfinite(result.grad_norm)) {
    const std::string what = fmt::format("step {}: loss {} (aux {}), gradient norm {}", step_ + 1, result.loss,
                                         result.aux_loss, result.grad_norm);
    if (config_.train.on_nonfinite == config::NonfinitePolicy::kStop) {
      throw std::runtime_error(what + ": not finite; nothing of this step was applied (train.on_nonfinite = stop; "
                               "lower train.lr, raise train.warmup_steps, or set it to skip)");
    }
    if (++consecutive_skips_ > config_.train.max_consecutive_skips) {
      throw std::runtime_error(what + ": " + std::to_string(consecutive_skips_) +
                               " non-finite steps in a row (train.max_consecutive_skips = " +
                               std::to_string(config_.train.max_consecutive_skips) + "); training diverged");
    }
    console_->warn(what + ": not finite, step skipped (train.on_nonfinite = skip)");
    model_->zero_grad(/*set_to_none=*/true);
    result.skipped = true;
    ++step_;
    tokens_seen_ += tokens;
    return result;
  }
  consecutive_skips_ = 0;
  scale_gradients_to_norm(parameters_, config_.train.grad_clip, result.grad_norm);
  optimizer_->step();
  update_routers(result.pairs_LE, tokens);
  ++step_;
  tokens_seen_ += tokens;
  return result;
}

Tensor Trainer::global_moe_rows(const Tensor& stage_rows_LX, int64_t width, torch::Dtype dtype) {
  if (total_moe_layers_ == 0) return Tensor();
  Tensor all = torch::zeros({total_moe_layers_, width}, dtype);
  if (stage_rows_LX.defined()) {
    all.narrow(0, moe_layers_before_stage_, stage_rows_LX.size(0)).copy_(stage_rows_LX);
  }
  parallel_.world_group.all_reduce_sum(all);  // stages fill their rows; data-parallel ranks add
  return all;
}

Tensor Trainer::global_expert_counts(const Tensor& stage_pairs_LE) {
  return global_moe_rows(stage_pairs_LE, config_.moe.num_experts, torch::kLong);
}

Tensor Trainer::take_router_eval_stats() {
  const std::vector<model::Moe> layers = model_->moe_layers();
  Tensor stage_L2;
  if (!layers.empty()) {
    stage_L2 = torch::zeros({static_cast<int64_t>(layers.size()), 2}, torch::kDouble);  // [L_stage, (entropy, tokens)]
    for (size_t l = 0; l < layers.size(); ++l) {
      const model::RouterEvalStats stats = layers[l]->gate->take_eval_stats();
      stage_L2[static_cast<int64_t>(l)][0] = stats.entropy_sum;
      stage_L2[static_cast<int64_t>(l)][1] = static_cast<double>(stats.tokens);
    }
  }
  return global_moe_rows(stage_L2, 2, torch::kDouble);
}

void Trainer::update_routers(const Tensor& pairs_LE, int64_t tokens) {
  const std::vector<model::Moe> layers = model_->moe_layers();
  if (layers.empty() || !pairs_LE.defined()) return;
  model::RouterStepStats stats;
  stats.tokens = tokens;
  // ReMoE's L1 coefficient follows the sparsity of all layers together (routers.md §ReMoE); the
  // counts are global, so every rank keeps the same router state.
  stats.active_fraction_all_layers =
      pairs_LE.sum().item<double>() / static_cast<double>(tokens * config_.moe.num_experts * pairs_LE.size(0));
  for (size_t l = 0; l < layers.size(); ++l) {
    stats.pairs_per_expert_E = pairs_LE[moe_layers_before_stage_ + static_cast<int64_t>(l)].to(device_);
    layers[l]->gate->update_after_step(stats);
  }
}

EvalResult Trainer::run_evaluation() {
  // Data-parallel ranks split the eval micro-batches (the sampler interleaves them by rank);
  // the stages pass activations forward; sums are reduced over the world.
  const parallel::ParallelLayout& layout = parallel_.layout();
  data::SamplerOptions options = valid_options_;
  options.rank = layout.dp_rank;
  options.world_size = layout.dp;
  const int64_t steps = (config_.train.eval_steps + layout.dp - 1) / layout.dp;
  model_->eval();
  for (const model::Moe& layer : model_->moe_layers()) layer->gate->take_eval_stats();  // sums start at zero
  EvalResult result = evaluate(
      [&](const data::Batch& batch) { return pipeline_forward(*model_, parallel_, batch, config_.train.precision); },
      valid_dataset_, options, steps);
  model_->train();
  Tensor sums = torch::tensor({layout.last_stage() ? result.loss_sum : 0.0,
                               layout.last_stage() ? static_cast<double>(result.tokens) : 0.0},
                              torch::kDouble);
  parallel_.world_group.all_reduce_sum(sums);
  result.loss_sum = sums[0].item<double>();
  result.tokens = static_cast<int64_t>(sums[1].item<double>());
  result.loss = result.loss_sum / static_cast<double>(result.tokens);
  result.perplexity = std::exp(result.loss);
  result.pairs_LE = global_expert_counts(result.pairs_LE);
  if (result.pairs_LE.defined()) result.expert_load_LE = expert_load_fractions(result.pairs_LE);
  const Tensor router_L2 = take_router_eval_stats();  // collective: every rank calls it
  if (!is_logging_rank()) return result;
  ordered_json line{{"step", step_},           {"split", "valid"},       {"loss", result.loss},
                    {"perplexity", result.perplexity}, {"tokens", result.tokens}};
  if (result.expert_load_LE.defined()) {
    line["expert_load"] = load_json_array(result.expert_load_LE);
    // Per MoE layer: mean routing entropy (nats) and routed (token, expert) pairs per token.
    const Tensor routed_tokens_L = router_L2.select(1, 1).clamp_min(1.0);
    line["router_entropy"] = json_vector(router_L2.select(1, 0) / routed_tokens_L);
    line["active_experts"] = json_vector(result.pairs_LE.to(torch::kDouble).sum(1) / routed_tokens_L);
  }
  metrics_->write(line);
  info(fmt::format("eval step {} | valid loss {:.4f} | perplexity {:.2f} | {} tokens", step_, result.loss,
                   result.perplexity, result.tokens));
  return result;
}

fs::path Trainer::save() {
  const parallel::ParallelLayout& layout = parallel_.layout();
  const fs::path checkpoints_dir = options_.run_dir / config_.checkpoint.dir;
  checkpoint::Checkpoint ck;
  ck.progress = {step_, tokens_seen_, train_sampler_->state()};
  ck.config = ordered(config::to_json(config_));
  ck.layout = {{"pipeline_parallel_size", layout.pp}, {"data_parallel_size", layout.dp}};
  if (!config_.data.tokenizer.empty() && fs::exists(config_.data.tokenizer)) ck.tokenizer = config_.data.tokenizer;
  const at::Tensor rng_state = at::detail::getDefaultCPUGenerator().get_state();
  if (!parallel_.distributed()) {
    ck.model = checkpoint::model_state(*model_);
    ck.optimizer = optimizer_state_by_name(*model_, *optimizer_);
    ck.rng = {{"cpu", rng_state}};
    const fs::path dir = checkpoint::save_checkpoint(checkpoints_dir, ck, config_.checkpoint.keep_last);
    info("checkpoint " + dir.string());
    return dir;
  }
  // Many writers (shared file system): rank 0 opens the temporary directory, each stage's first
  // data-parallel rank writes that stage's shards, every rank its random state, rank 0 seals it.
  const fs::path tmp_dir = checkpoints_dir / (".tmp-" + checkpoint::step_dir_name(step_));
  if (is_logging_rank()) checkpoint::begin_checkpoint(checkpoints_dir, step_);
  parallel_.world_group.barrier();
  if (layout.dp_rank == 0) {
    char suffix[32];
    std::snprintf(suffix, sizeof(suffix), "-stage-%02lld.safetensors", static_cast<long long>(layout.stage));
    checkpoint::write_checkpoint_file(tmp_dir, std::string("model") + suffix,
                                      without_tied_copy(checkpoint::model_state(*model_), stage_));
    checkpoint::write_checkpoint_file(tmp_dir, std::string("optimizer") + suffix,
                                      without_tied_copy(optimizer_state_by_name(*model_, *optimizer_), stage_));
  }
  const std::string rank = std::to_string(parallel_.world().rank);
  checkpoint::write_checkpoint_file(tmp_dir, "rng-rank-" + rank + ".safetensors", {{"rank" + rank + "/cpu", rng_state}});
  parallel_.world_group.barrier();
  fs::path dir = checkpoints_dir / checkpoint::step_dir_name(step_);
  if (is_logging_rank()) dir = checkpoint::finish_checkpoint(checkpoints_dir, tmp_dir, ck, config_.checkpoint.keep_last);
  parallel_.world_group.barrier();
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
                   train.global_batch_size * train.seq_length, micro_batches_per_global_batch_, step_ + 1, stop_step,
                   train.max_steps, peak_flops_ / 1e9, config_.log.peak_tflops > 0 ? " (config)" : " (measured)"));
  if (parallel_.distributed()) {
    const parallel::ParallelLayout& layout = parallel_.layout();
    info(fmt::format("rank {} of {} ({}): data-parallel {} of {}, pipeline stage {} of {} (layers {}..{}), {} "
                     "micro-batches per step on this rank, schedule {}",
                     parallel_.world().rank, parallel_.world().world_size, parallel_.world().launcher, layout.dp_rank,
                     layout.dp, layout.stage, layout.pp, stage_.first_layer, stage_.end_layer - 1,
                     micro_batches_per_step_, config::to_string(config_.parallel.pipeline_schedule)));
  }

  auto redraw_plots = [&] {
    if (!plots_enabled_ || !is_logging_rank()) return;
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

  ProgressBar bar(step_, train.max_steps, config_.log.progress && is_logging_rank());
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
      if (result.skipped) line["skipped"] = true;
      // MFU of the whole run: every process is assumed to have the peak rank 0 measured.
      const double mfu = peak_flops_ > 0 ? tokens_per_s * flops_per_token_ /
                                               (peak_flops_ * static_cast<double>(parallel_.world().world_size))
                                         : 0.0;
      line["mfu"] = mfu;
      if (parallel_.layout().pp > 1) line["pipeline_bubble"] = result.pipeline_bubble;
      if (interval_pairs_LE.defined()) line["expert_load"] = load_json_array(expert_load_fractions(interval_pairs_LE));
      if (metrics_) metrics_->write(line);
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
