// The run's checkpoints as the trainer sees them (docs/training.md, "Checkpoints"): what a
// checkpoint holds of this rank (its stage's weights and AdamW state by name, its CPU random
// state and that of its CUDA device), who writes what (each stage's first data-parallel rank its
// stage's shards, every rank its random state, rank 0 opens and seals the directory, barriers
// between), and what a restore accepts (the keys' roles, config::KeyRole). Tensors are stored
// whole, every expert by its global index, whatever the expert parallelism or optimizer
// sharding: they are gathered on save and sliced on load, so any layout resumes any other.
// One process is the layout with one stage and one rank: the same files, the same code.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/distributed_optimizer.h"

namespace yuanmoe::train {

namespace fs = std::filesystem;

/// What a restore found: the run's own newest checkpoint (resumed), train.init_from's weights
/// (a fine-tune from `dir`, at its step `init_step`; progress starts at 0), or nothing (fresh).
struct Resumed {
  enum class Kind { kFresh, kResumed, kFineTune } kind = Kind::kFresh;
  fs::path dir;
  checkpoint::TrainingProgress progress;
  int64_t init_step = 0;
  std::vector<std::string> notes;  // knobs that differ from the checkpoint's config (new values used)
};

class CheckpointManager {
 public:
  /// `checkpoints_dir`: the run dir's checkpoint.dir. `device`: where this rank trains (its CUDA
  /// generator is saved and restored next to the CPU one).
  CheckpointManager(const config::RunConfig& config, fs::path checkpoints_dir,
                    const parallel::ParallelContext& parallel, torch::Device device);

  /// Loads the newest complete checkpoint of the run into `model` (this stage's weights) and
  /// `optimizer` (their AdamW state), and this rank's random state when the checkpoint was written
  /// at this layout (another layout reseeds: dropout masks then differ, as they would anyway).
  /// nullopt when the run has no checkpoint. Throws naming the directory and every key when an
  /// architecture or context key differs.
  std::optional<Resumed> resume(model::TransformerImpl& model, DistributedOptimizer& optimizer) const;

  /// resume(), else the weights of train.init_from when set (load_init_from), else nothing.
  Resumed restore(model::TransformerImpl& model, DistributedOptimizer& optimizer) const;

  /// Writes step progress.step: a collective, every rank calls it. Returns the step directory.
  fs::path save(const checkpoint::TrainingProgress& progress, model::TransformerImpl& model,
                DistributedOptimizer& optimizer) const;

 private:
  const config::RunConfig& config_;
  const fs::path checkpoints_dir_;
  const parallel::ParallelContext& parallel_;
  const torch::Device device_;
};

/// Loads the weights of the checkpoint train.init_from names into `model` (its pipeline stage's
/// part; this rank's experts under `experts`) after checking that the architecture matches the
/// config (the context keys may change: a fine-tune to a longer context). Returns the
/// checkpoint's directory and step.
std::pair<fs::path, int64_t> load_init_from(torch::nn::Module& model, const config::RunConfig& config,
                                            const parallel::ExpertSharding& experts = {});

}  // namespace yuanmoe::train
