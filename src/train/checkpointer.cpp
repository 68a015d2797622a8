#include "yuanmoe/train/checkpointer.h"

#include <ATen/Context.h>

#include <set>
#include <tuple>

#include "yuanmoe/config/config_io.h"

namespace yuanmoe::train {

namespace {

/// Throws when a key the loading mode must keep differs between the checkpoint's config and
/// `current`; returns the knobs that differ, as log notes.
std::vector<std::string> check_compatible(const config::RunConfig& saved, const config::RunConfig& current,
                                          const fs::path& dir, bool fine_tune) {
  std::string mismatches;
  std::vector<std::string> notes;
  for (const config::ConfigDifference& d : config::config_differences(saved, current)) {
    const bool allowed = d.role == config::KeyRole::kKnob || (fine_tune && d.role == config::KeyRole::kContext);
    if (allowed) {
      if (d.role == config::KeyRole::kKnob) notes.push_back(d.path + " differs from the checkpoint's config; using the new value");
      continue;
    }
    mismatches += (mismatches.empty() ? "" : "; ") + d.path + " is " + d.before + " in the checkpoint, " + d.after +
                  " in the config";
  }
  if (!mismatches.empty()) {
    throw std::runtime_error(dir.string() + ": architecture differs: " + mismatches +
                             (fine_tune ? "" : " (use a new run dir, or train.init_from to fine-tune)"));
  }
  return notes;
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

/// What a stage writes: its tensors without the last stage's copy of a tied embedding (the
/// first stage's is the one).
checkpoint::NamedTensors without_tied_copy(const checkpoint::NamedTensors& state, const model::StageSpec& stage) {
  checkpoint::NamedTensors out;
  for (const auto& [name, t] : state) {
    if (!stage.holds_tied_copy(name)) out.emplace_back(name, t);
  }
  return out;
}

std::string rng_key(int64_t rank, const std::string& generator) { return "rank" + std::to_string(rank) + "/" + generator; }

}  // namespace

CheckpointManager::CheckpointManager(const config::RunConfig& config, fs::path checkpoints_dir,
                                     const parallel::ParallelContext& parallel, torch::Device device)
    : config_(config), checkpoints_dir_(std::move(checkpoints_dir)), parallel_(parallel), device_(device) {}

std::optional<Resumed> CheckpointManager::resume(model::TransformerImpl& model, DistributedOptimizer& optimizer) const {
  const std::optional<fs::path> latest = checkpoint::find_latest_checkpoint(checkpoints_dir_);
  if (!latest) return std::nullopt;
  const checkpoint::Checkpoint saved = checkpoint::load_checkpoint(*latest);
  Resumed resumed;
  resumed.kind = Resumed::Kind::kResumed;
  resumed.dir = *latest;
  resumed.progress = saved.progress;
  resumed.notes = check_compatible(saved.config, config_, *latest, /*fine_tune=*/false);
  checkpoint::load_model_state(model, optimizer.experts().to_local(for_stage(saved.model, model)), latest->string());
  optimizer.load_state_by_name(for_stage(saved.optimizer, model), latest->string());

  const parallel::ParallelLayout& layout = parallel_.layout();
  if (saved.layout.pipeline_parallel_size == layout.pp && saved.layout.data_parallel_size == layout.dp) {
    const int64_t rank = parallel_.world().rank;
    for (const auto& [name, state] : saved.rng) {
      // "cpu": a one-process checkpoint of an earlier version.
      if (name == rng_key(rank, "cpu") || (name == "cpu" && rank == 0)) {
        at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle: shares the state
        generator.set_state(state);
      } else if (name == rng_key(rank, "cuda") && device_.is_cuda()) {
        at::Generator generator = at::globalContext().defaultGenerator(device_);
        generator.set_state(state);
      }
    }
  }
  return resumed;
}

Resumed CheckpointManager::restore(model::TransformerImpl& model, DistributedOptimizer& optimizer) const {
  if (std::optional<Resumed> resumed = resume(model, optimizer)) return *resumed;
  Resumed restored;
  if (!config_.train.init_from.empty()) {
    restored.kind = Resumed::Kind::kFineTune;
    std::tie(restored.dir, restored.init_step) = load_init_from(model, config_, optimizer.experts());
  }
  return restored;
}

fs::path CheckpointManager::save(const checkpoint::TrainingProgress& progress, model::TransformerImpl& model,
                                 DistributedOptimizer& optimizer) const {
  const parallel::ParallelLayout& layout = parallel_.layout();
  const int64_t rank = parallel_.world().rank;
  checkpoint::Checkpoint ck;
  ck.progress = progress;
  ck.config = config_;
  ck.layout = {layout.pp, layout.dp, layout.ep, optimizer.sharded()};
  if (!config_.data.tokenizer.empty() && fs::exists(config_.data.tokenizer)) ck.tokenizer = config_.data.tokenizer;

  // Rank 0 opens the temporary directory, each stage's first data-parallel rank writes that
  // stage's shards, every rank its random state, rank 0 seals it (a shared file system).
  const fs::path tmp_dir = checkpoint::temporary_checkpoint_dir(checkpoints_dir_, progress.step);
  if (rank == 0) checkpoint::begin_checkpoint(checkpoints_dir_, progress.step);
  parallel_.world_group.barrier();
  // Gathered in the global layout by every rank of the stage (collectives), written by one.
  const checkpoint::NamedTensors model_state =
      optimizer.experts().to_global(checkpoint::model_state(model), parallel_.ep);
  const checkpoint::NamedTensors optimizer_state = optimizer.state_by_name();
  if (layout.dp_rank == 0) {
    checkpoint::write_checkpoint_file(tmp_dir, checkpoint::model_file(layout.stage),
                                      without_tied_copy(model_state, model.stage));
    checkpoint::write_checkpoint_file(tmp_dir, checkpoint::optimizer_file(layout.stage),
                                      without_tied_copy(optimizer_state, model.stage));
  }
  checkpoint::NamedTensors rng{{rng_key(rank, "cpu"), at::detail::getDefaultCPUGenerator().get_state()}};
  if (device_.is_cuda()) rng.emplace_back(rng_key(rank, "cuda"), at::globalContext().defaultGenerator(device_).get_state());
  checkpoint::write_checkpoint_file(tmp_dir, checkpoint::rng_file(rank), rng);
  parallel_.world_group.barrier();
  fs::path dir = checkpoints_dir_ / checkpoint::step_dir_name(progress.step);
  if (rank == 0) dir = checkpoint::finish_checkpoint(checkpoints_dir_, tmp_dir, ck, config_.checkpoint.keep_last);
  parallel_.world_group.barrier();
  return dir;
}

std::pair<fs::path, int64_t> load_init_from(torch::nn::Module& model, const config::RunConfig& config,
                                            const parallel::ExpertSharding& experts) {
  const fs::path dir = checkpoint::resolve_checkpoint_dir(config.train.init_from);
  const checkpoint::Checkpoint saved = checkpoint::load_checkpoint(dir, checkpoint::LoadParts::kModelOnly);
  check_compatible(saved.config, config, dir, /*fine_tune=*/true);
  checkpoint::load_model_state(model, experts.to_local(for_stage(saved.model, model)), dir.string());
  return {dir, saved.progress.step};
}

}  // namespace yuanmoe::train
