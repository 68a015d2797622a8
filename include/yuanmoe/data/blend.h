// Weighted mixtures of indexed datasets, Megatron's BlendedDataset (megatron/core/datasets/
// blended_dataset.py, its index built by build_blending_indices in helpers.cpp): global sample i
// goes to the source furthest below its share, argmax_j (w_j * max(i, 1) - n_j(i)), with w
// normalised to sum to 1 and n_j(i) the samples source j received before i (ties: the lowest j).
// Each source is a GptSampler-style stream of its own (own shuffles, own epochs, a seed derived
// from the run seed and the source index); the k-th sample a source receives is sample k of that
// stream. Data-parallel ranks split each block of world_size * micro_batch_size global samples
// as GptSampler does, so the state depends only on the samples consumed (docs/data.md, "Blends").
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "yuanmoe/data/indexed_dataset.h"
#include "yuanmoe/data/sampler.h"

namespace yuanmoe::data {

/// Megatron's assignment of the next global sample: argmax_j (weights[j] * max(index, 1) -
/// counts[j]), the first j on ties. `weights` normalised (sum 1), `counts` the samples each source
/// has received before `index`.
int64_t blend_source(const std::vector<double>& weights, const std::vector<int64_t>& counts, int64_t index);

/// weights / their sum (Megatron's normalize); throws std::invalid_argument unless all are > 0.
std::vector<double> normalise_blend_weights(const std::vector<double>& weights);

/// The seed of source `source`'s stream in a blend of run seed `seed` (SplitMix64 of both).
uint64_t blend_source_seed(uint64_t seed, int64_t source);

/// Where a blend stands (saved in checkpoints); independent of the data-parallel layout.
struct BlendState {
  uint64_t seed = 0;     ///< the run seed the source seeds derive from
  int64_t samples = 0;   ///< global samples consumed, all ranks and sources together
  std::vector<SamplerState> sources;  ///< each source's stream: its seed, epoch and cursor
  std::vector<int64_t> counts;        ///< samples each source has received (sum = samples)

  bool operator==(const BlendState& o) const {
    return seed == o.seed && samples == o.samples && sources == o.sources && counts == o.counts;
  }
};

void to_json(nlohmann::json& j, const BlendState& state);
/// Throws std::invalid_argument naming the key when one is missing, of the wrong type, or the
/// counts do not add up to `samples`.
void from_json(const nlohmann::json& j, BlendState& state);

class BlendedSampler {
 public:
  /// One dataset per source with its (positive, unnormalised) weight and its sampler options
  /// (EOD, vocabulary, ...); rank, world size, micro-batch size and sequence length come from
  /// `options`, each source's seed is blend_source_seed(options.seed, j). Throws
  /// std::invalid_argument for bad weights or a source the sampler rejects (naming its prefix).
  BlendedSampler(std::vector<std::shared_ptr<const IndexedDataset>> datasets, std::vector<double> weights,
                 const std::vector<SamplerOptions>& source_options, const SamplerOptions& options);

  /// The next micro-batch of this rank: global samples [samples + rank * B, samples + rank * B + B);
  /// advances the state by world_size * B samples.
  Batch next_batch();
  /// The source of each sample of the last batch (B entries).
  const std::vector<int64_t>& batch_sources() const { return batch_sources_; }

  const BlendState& state() const { return state_; }
  /// Resumes; throws std::invalid_argument when the state has another number of sources or a
  /// source's cursor does not fit its dataset.
  void set_state(const BlendState& state);

  const std::vector<double>& weights() const { return weights_; }  ///< normalised

 private:
  std::vector<std::unique_ptr<GptSampler>> sources_;
  std::vector<double> weights_;
  SamplerOptions options_;
  std::vector<SamplerOptions> source_options_;
  BlendState state_;
  std::vector<int64_t> batch_sources_;
};

}  // namespace yuanmoe::data
