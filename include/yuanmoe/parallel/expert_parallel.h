// Expert parallelism applied to a built model (docs/parallelism.md, "Expert parallelism"):
// each MoE layer keeps only this rank's experts, and its tokens reach the other experts through
// the ep group's all-to-all. Checkpoints keep the global layout (every expert, by global index),
// so tensors are sliced to this rank's experts on load and gathered on save.
#pragma once

#include <memory>
#include <set>
#include <string>

#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::parallel {

/// Wall seconds this rank spent, summed over layers and steps: what the all-to-all costs against
/// the experts' own work (docs/parallelism.md). Timed on the host around blocking collectives,
/// so on CUDA they include the queued kernels the collective waits for.
struct ExpertParallelTimes {
  double all_to_all = 0.0;        // counts, dispatch and combine, forward and backward (waits for peers included)
  double experts_forward = 0.0;   // from a layer's dispatch to its combine: the local experts
  double experts_backward = 0.0;  // from the combine's backward to the dispatch's: their backward
};

/// Which entries of a model's state are expert weights, and which slice of them this rank holds.
struct ExpertSharding {
  int64_t ranks = 1, rank = 0;         // the ep group
  std::set<std::string> names;         // parameter names of the experts' weights ([E, ...] tensors)
  std::shared_ptr<const ExpertParallelTimes> times;  // null without expert parallelism

  /// The parameter an entry belongs to is an expert weight ("{name}" or "{name}/exp_avg", ...).
  bool is_expert_entry(const std::string& entry) const;
  /// Global [E, ...] expert entries -> this rank's [E / ranks, ...] slice; the rest unchanged.
  checkpoint::NamedTensors to_local(const checkpoint::NamedTensors& global) const;
  /// This rank's expert entries gathered over `ep` into [E, ...] (a collective: every rank of
  /// the group calls it with the same entries); the rest unchanged.
  checkpoint::NamedTensors to_global(const checkpoint::NamedTensors& local, const Group& ep) const;
};

/// The expert weights of `model` by name (whole-model layout: every expert).
ExpertSharding expert_weights(const model::TransformerImpl& model);

/// Keeps this rank's experts in every MoE layer of `model` (initialised in full beforehand, so
/// every layout starts from the same weights) and swaps in an all-to-all token dispatcher over
/// `parallel.ep` (Megatron-Core's MoEAlltoAllTokenDispatcher; model/token_dispatcher.h).
/// Returns the sharding; a no-op (ranks = 1) when parallel.expert is 1.
ExpertSharding apply_expert_parallel(model::TransformerImpl& model, const ParallelContext& parallel);

}  // namespace yuanmoe::parallel
