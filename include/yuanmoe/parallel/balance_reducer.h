// The data-parallel sum behind moe.balance_scope = global_batch (docs/routers.md, "Balancing
// scope"), applied to a built model from outside like the expert dispatcher: each top-k
// router's balancer sums its routed-pair counts over the stage's data-parallel ranks through it
// (only the global-batch balancer reads it).
#pragma once

#include <memory>

#include "yuanmoe/model/balancing.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::parallel {

/// A sum over `parallel.dp` (expert-parallel ranks included: they are data-parallel for the
/// router); null with one data-parallel rank (a layer's own counts).
std::shared_ptr<const model::StatisticsReducer> make_balance_reducer(const ParallelContext& parallel);

/// make_balance_reducer's reducer in the balancer of every top-k router of `model`.
void apply_balance_reducer(model::TransformerImpl& model, const ParallelContext& parallel);

}  // namespace yuanmoe::parallel
