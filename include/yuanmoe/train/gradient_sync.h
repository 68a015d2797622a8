// Gradients across ranks after a step's backward passes (docs/parallelism.md): the tied
// embedding's two copies summed, the data-parallel mean, and the global norm for clipping.
// Every call is a no-op reduction in a single process.
#pragma once

#include <vector>

#include "yuanmoe/core/types.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::train {

/// `tied_embedding`: the embedding weight on the first or last stage of a pipeline whose
/// embedding is tied (undefined otherwise); its gradient becomes the sum over both copies
/// (Megatron). Then every gradient becomes its mean over the data-parallel group, reduced in
/// fp32 buckets of about 25 MB. Missing gradients become zeros so all ranks reduce one list.
void synchronize_gradients(const std::vector<Tensor>& parameters, const Tensor& tied_embedding,
                           const parallel::ParallelContext& parallel);

/// The tied embedding's two copies' gradients summed over the embedding group (a no-op
/// without one).
void sum_tied_embedding_gradient(const Tensor& tied_embedding, const parallel::ParallelContext& parallel);

/// Every gradient summed over `group` and divided by `divisor` (the data-parallel size: under
/// expert parallelism the experts' group is smaller than the data-parallel one, but each expert's
/// gradient already sums its ep group's tokens), in fp32 buckets of about 25 MB. Missing gradients
/// become zeros so every rank reduces one list.
void all_reduce_mean(const std::vector<Tensor>& parameters, const parallel::Group& group, int64_t divisor);

/// sqrt of the sum of squared gradient entries of `parameters` over the pipeline stages
/// (data-parallel ranks hold equal gradients by then). Leave the last stage's tied copy out.
double global_gradient_norm(const std::vector<Tensor>& parameters, const parallel::ParallelContext& parallel);

}  // namespace yuanmoe::train
