// Where a run's batches come from, opened and checked once: one prefix (data.train_prefix) or a
// weighted mixture of several (data.blend, Megatron's BlendedDataset rule: docs/data.md,
// "Blends"), and the validation splits evaluated beside them. The trainer asks for the next
// micro-batch and saves or restores the cursor; it never branches on where the data comes from.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/config/config.h"
#include "yuanmoe/data/blend.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::train {

/// One validation split: its name in the eval lines ("" for data.valid_prefix), its blend weight
/// (1 for data.valid_prefix) and the options of its sampler (the train split's EOD and lengths).
struct ValidationSplit {
  std::string name;
  double weight = 1.0;
  std::shared_ptr<const data::IndexedDataset> dataset;
  data::SamplerOptions options;
};

class TrainingData {
 public:
  /// Opens data.train_prefix or data.blend for data-parallel rank layout.dp_rank of layout.dp,
  /// and the validation splits. Throws config::ConfigError naming the key (data.blend[i], ...)
  /// on bad input. `info` receives the one line that describes a blend.
  TrainingData(const config::RunConfig& config, const parallel::ParallelLayout& layout,
               const std::function<void(const std::string&)>& info);

  /// This rank's next training micro-batch.
  data::Batch next_batch();
  /// The cursor into `progress` (the sampler's, or the blend's), for a checkpoint.
  void save(checkpoint::TrainingProgress& progress) const;
  /// Continues from a checkpoint's cursor; throws config::ConfigError when the checkpoint was
  /// written on the other kind of data (a blend vs one prefix) or its blend does not fit.
  void restore(const checkpoint::TrainingProgress& progress, const std::filesystem::path& checkpoint_dir);

  /// The splits to evaluate: data.valid_prefix first when set (named ""), then the blend entries
  /// that name a valid_prefix, in blend order (train/evaluator.h says what the headline is).
  const std::vector<ValidationSplit>& validation() const { return validation_; }

 private:
  void open_prefix(const config::RunConfig& config, const parallel::ParallelLayout& layout);
  void open_blend(const config::RunConfig& config, const parallel::ParallelLayout& layout,
                  const std::function<void(const std::string&)>& info);

  std::unique_ptr<data::GptSampler> sampler_;   // data.train_prefix
  std::unique_ptr<data::BlendedSampler> blend_;  // data.blend (then sampler_ is null)
  std::vector<ValidationSplit> validation_;
};

}  // namespace yuanmoe::train
