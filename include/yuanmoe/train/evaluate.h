// Validation: mean next-token loss, perplexity and per-expert load over the first `steps`
// micro-batches of a split, in file order (the same batches at every evaluation).
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "yuanmoe/config/config.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::train {

struct EvalResult {
  double loss = 0.0;        // mean over tokens
  double perplexity = 0.0;  // exp(loss)
  int64_t tokens = 0;
  int64_t batches = 0;
  Tensor expert_share_LE;   // fp64 [MoE layers, E]: each expert's share of the routed pairs
  // The raw sums behind them, for reducing across ranks.
  double loss_sum = 0.0;    // sum of per-token losses (0 where the stage has no head)
  Tensor routed_pairs_LE;   // int64 counts, CPU; undefined when the model (stage) has no MoE layer

  /// loss, perplexity and the shares from the sums (again after the sums are reduced over ranks).
  void finish();
};

/// One micro-batch through the model (or this rank's pipeline stage), in eval mode: logits in
/// `out` where this rank computes them, undefined elsewhere.
using EvalForward = std::function<model::ModelOutput(const data::Batch&)>;

/// `forward` on up to `steps` micro-batches of the split (fewer when it is shorter).
EvalResult evaluate(const EvalForward& forward,
                    std::shared_ptr<const data::IndexedDataset> dataset,
                    data::SamplerOptions options,
                    int64_t steps,
                    const std::function<void(const data::Batch&, const Tensor& logits_BSV)>& on_first_batch = {});

/// Sampler options of `run` for the dataset at `prefix`: sequence length, micro-batch size, seed,
/// position-id resetting, and the EOD id from data.eod_id, else from PREFIX.meta.json; -1 when
/// neither names it (the caller decides whether that is an error). With `loss_mask` (absent:
/// data.loss_mask) = sft, the SFT mask and the <sep> id from data.sep_id, else PREFIX.meta.json,
/// else data.tokenizer; throws config::ConfigError naming data.sep_id when none has it.
data::SamplerOptions sampler_options(const config::RunConfig& run, const std::string& prefix,
                                     std::optional<config::LossMask> loss_mask = std::nullopt);

/// Runs `model` (switched to eval mode, restored after) on up to `steps` micro-batches of
/// `options.micro_batch_size` sequences; fewer when the split is shorter than that. The first
/// batch's logits go to `on_first_batch` when given (eval --dump-logits).
EvalResult evaluate(model::TransformerImpl& model,
                    std::shared_ptr<const data::IndexedDataset> dataset,
                    data::SamplerOptions options,
                    int64_t steps,
                    config::Precision precision,
                    const std::function<void(const data::Batch&, const Tensor& logits_BSV)>& on_first_batch = {});

/// The evaluation of a blend from its sources' (data.blend entries with a valid_prefix, each
/// finished): loss = sum_j w_j loss_j / sum_j w_j over the sources' weights (as Megatron's blended
/// validation set weighs them), perplexity = exp(loss); tokens, batches, loss_sum and routed pairs
/// are the sums.
EvalResult blend_eval_result(const std::vector<EvalResult>& sources, const std::vector<double>& weights);

/// routed_pairs_LE (int64 counts) -> each expert's share of its layer's routed pairs (rows sum to 1).
Tensor expert_share(const Tensor& routed_pairs_LE);

}  // namespace yuanmoe::train
