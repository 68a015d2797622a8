// Megatron's BlendedDataset as a stream: the blending rule of helpers.cpp applied one global
// sample at a time, each source a GptSampler-style stream of its own.
#include "yuanmoe/data/blend.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace yuanmoe::data {

namespace {

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

const nlohmann::json& integer_key(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.is_object()) throw std::invalid_argument(where + ": expected an object");
  if (!j.contains(key)) throw std::invalid_argument(where + ": missing key \"" + key + "\"");
  const auto& value = j.at(key);
  if (!value.is_number_integer()) throw std::invalid_argument(where + ": \"" + key + "\" must be an integer");
  return value;
}

}  // namespace

int64_t blend_source(const std::vector<double>& weights, const std::vector<int64_t>& counts, int64_t index) {
  // helpers.cpp, build_blending_indices: the error of each source, the first maximum wins.
  const double position = std::max(static_cast<double>(index), 1.0);
  int64_t best = 0;
  double best_error = weights[0] * position - static_cast<double>(counts[0]);
  for (size_t j = 1; j < weights.size(); ++j) {
    const double error = weights[j] * position - static_cast<double>(counts[j]);
    if (error > best_error) {
      best_error = error;
      best = static_cast<int64_t>(j);
    }
  }
  return best;
}

std::vector<double> normalise_blend_weights(const std::vector<double>& weights) {
  if (weights.empty()) throw std::invalid_argument("blend: no sources");
  double sum = 0.0;
  for (size_t j = 0; j < weights.size(); ++j) {
    if (!(weights[j] > 0) || !std::isfinite(weights[j])) {
      throw std::invalid_argument("blend: weight " + std::to_string(j) + " must be a positive number, got " +
                                  std::to_string(weights[j]));
    }
    sum += weights[j];
  }
  if (!std::isfinite(sum)) throw std::invalid_argument("blend: the weights add up to more than a double holds");
  std::vector<double> out(weights.size());
  for (size_t j = 0; j < weights.size(); ++j) out[j] = weights[j] / sum;
  return out;
}

uint64_t blend_source_seed(uint64_t seed, int64_t source) {
  return splitmix64(seed ^ splitmix64(0xB1E7D000ULL + static_cast<uint64_t>(source)));
}

void to_json(nlohmann::json& j, const BlendState& state) {
  nlohmann::json sources = nlohmann::json::array();
  for (size_t s = 0; s < state.sources.size(); ++s) {
    nlohmann::json source;
    to_json(source, state.sources[s]);
    source["samples"] = s < state.counts.size() ? state.counts[s] : 0;
    sources.push_back(std::move(source));
  }
  j = nlohmann::json{{"seed", state.seed}, {"samples", state.samples}, {"sources", std::move(sources)}};
}

void from_json(const nlohmann::json& j, BlendState& state) {
  const std::string where = "blend sampler state";
  state.seed = integer_key(j, "seed", where).get<uint64_t>();
  state.samples = integer_key(j, "samples", where).get<int64_t>();
  if (!j.contains("sources") || !j.at("sources").is_array()) {
    throw std::invalid_argument(where + ": \"sources\" must be a list");
  }
  state.sources.clear();
  state.counts.clear();
  int64_t total = 0;
  for (size_t s = 0; s < j.at("sources").size(); ++s) {
    const nlohmann::json& source = j.at("sources")[s];
    const std::string at = where + ": sources[" + std::to_string(s) + "]";
    SamplerState stream;
    stream.seed = integer_key(source, "seed", at).get<uint64_t>();
    stream.epoch = integer_key(source, "epoch", at).get<int64_t>();
    stream.cursor = integer_key(source, "cursor", at).get<int64_t>();
    const int64_t count = integer_key(source, "samples", at).get<int64_t>();
    if (count < 0) throw std::invalid_argument(at + ": \"samples\" must be >= 0");
    state.sources.push_back(stream);
    state.counts.push_back(count);
    total += count;
  }
  if (total != state.samples) {
    throw std::invalid_argument(where + ": the sources' samples add up to " + std::to_string(total) + ", not " +
                                std::to_string(state.samples));
  }
}

BlendedSampler::BlendedSampler(std::vector<std::shared_ptr<const IndexedDataset>> datasets,
                               std::vector<double> weights, const std::vector<SamplerOptions>& source_options,
                               const SamplerOptions& options)
    : weights_(normalise_blend_weights(weights)), options_(options), source_options_(source_options) {
  if (datasets.size() != weights.size() || source_options.size() != weights.size()) {
    throw std::invalid_argument("blend: " + std::to_string(datasets.size()) + " datasets, " +
                                std::to_string(weights.size()) + " weights and " +
                                std::to_string(source_options.size()) + " sampler options");
  }
  state_.seed = options.seed;
  for (size_t j = 0; j < datasets.size(); ++j) {
    SamplerOptions& o = source_options_[j];
    o.seq_length = options.seq_length;
    o.micro_batch_size = options.micro_batch_size;
    o.rank = options.rank;
    o.world_size = options.world_size;
    o.shuffle = options.shuffle;
    o.seed = blend_source_seed(options.seed, static_cast<int64_t>(j));
    sources_.push_back(std::make_unique<GptSampler>(datasets[j], o));
    state_.sources.push_back(sources_.back()->state());
    state_.counts.push_back(0);
  }
}

void BlendedSampler::set_state(const BlendState& state) {
  if (state.sources.size() != sources_.size() || state.counts.size() != sources_.size()) {
    throw std::invalid_argument("blend sampler state: " + std::to_string(state.sources.size()) +
                                " sources, but the blend has " + std::to_string(sources_.size()));
  }
  if (state.samples < 0 || std::accumulate(state.counts.begin(), state.counts.end(), int64_t{0}) != state.samples) {
    throw std::invalid_argument("blend sampler state: the sources' samples do not add up to " +
                                std::to_string(state.samples));
  }
  for (size_t j = 0; j < sources_.size(); ++j) sources_[j]->set_state(state.sources[j]);  // checks the cursor
  state_ = state;
}

Batch BlendedSampler::next_batch() {
  const int64_t B = options_.micro_batch_size;
  const int64_t S = options_.seq_length;
  const int64_t block = options_.world_size * B;
  const int64_t first = options_.rank * B;  // this rank's samples in the block
  BatchBuilder batch(B, S);
  std::vector<int64_t> sample(static_cast<size_t>(S) + 1);
  std::vector<uint8_t> instruction;  // the SFT sources' flags (SamplerOptions::sft_loss_mask)
  batch_sources_.assign(static_cast<size_t>(B), 0);
  // Every rank assigns the whole block (the rule is sequential) and reads only its own samples.
  for (int64_t t = 0; t < block; ++t) {
    const int64_t j = blend_source(weights_, state_.counts, state_.samples + t);
    SamplerState& stream = state_.sources[static_cast<size_t>(j)];
    GptSampler& source = *sources_[static_cast<size_t>(j)];
    if (t >= first && t < first + B) {
      const int64_t b = t - first;
      const SamplerOptions& options = source_options_[static_cast<size_t>(j)];
      instruction.resize(options.sft_loss_mask ? sample.size() : 0);
      source.sample_tokens(stream.epoch, stream.cursor, sample.data(), options.sft_loss_mask ? instruction.data() : nullptr);
      batch.set_row(b, sample, options, source.prefix(), instruction);
      batch_sources_[static_cast<size_t>(b)] = j;
    }
    ++state_.counts[static_cast<size_t>(j)];
    if (++stream.cursor == source.samples_per_epoch()) {
      stream.cursor = 0;
      ++stream.epoch;
      spdlog::info("data: blend source {} ({}) exhausted, starting epoch {} ({} samples per epoch)", j,
                   source.prefix(), stream.epoch, source.samples_per_epoch());
    }
  }
  state_.samples += block;
  // Every source shares the EOD id (the trainer checks it), so the documents follow one rule.
  return batch.finish(options_);
}

}  // namespace yuanmoe::data
