// The data-parallel sum behind moe.balance_scope = global_batch (docs/routers.md, "Balancing
// scope"), applied to a built model from outside like the expert exchange: each MoE layer sums
// its routed-pair counts over the stage's data-parallel ranks through it.
#pragma once

#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::parallel {

/// Installs a reducer over `parallel.dp` (expert-parallel ranks included: they are
/// data-parallel for the router) in every MoE layer of `model` when moe.balance_scope is
/// global_batch and there is more than one data-parallel rank; otherwise removes any (one
/// process: the layer's own counts).
void apply_balance_reducer(model::TransformerImpl& model, const ParallelContext& parallel);

}  // namespace yuanmoe::parallel
