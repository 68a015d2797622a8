// Validation during training: every split of the run's data through this rank's stage (the
// data-parallel ranks share its micro-batches, the stages pass activations on), the sums reduced
// over the world, and the routers' eval statistics of the headline's tokens. The headline is
// data.valid_prefix when set, else the weighted mean of the data.blend entries' own splits
// (docs/data.md, "Blends"). Every rank runs every split in the same order (collectives).
#pragma once

#include <string>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/evaluate.h"
#include "yuanmoe/train/moe_layer_rows.h"
#include "yuanmoe/train/training_data.h"

namespace yuanmoe::train {

/// One evaluation, the same on every rank.
struct EvalReport {
  EvalResult headline;
  std::vector<std::string> source_names;  // the data.blend entries with a valid_prefix
  std::vector<EvalResult> sources;
  /// [L, 4] fp64, over the headline's tokens, per MoE layer: routing entropy sum, routed tokens,
  /// tied and exactly tied tokens (model::RouterEvalStats); undefined without MoE layers.
  Tensor router_sums;
};

class Evaluator {
 public:
  /// `splits`: TrainingData::validation() (data.valid_prefix first, named "").
  Evaluator(const config::RunConfig& config, model::TransformerImpl& model, parallel::ParallelContext& parallel,
            std::vector<ValidationSplit> splits);

  bool has_splits() const { return !splits_.empty(); }
  /// Evaluates every split in eval mode and returns the model to training mode. A collective;
  /// only with splits.
  EvalReport run();

 private:
  EvalResult evaluate_split(const ValidationSplit& split);
  /// Every router's eval statistics since the last call, of the whole model. A collective.
  Tensor take_router_sums();

  const config::RunConfig& config_;
  model::TransformerImpl& model_;
  parallel::ParallelContext& parallel_;
  const std::vector<ValidationSplit> splits_;
  const MoeLayerRows layer_rows_;
};

}  // namespace yuanmoe::train
