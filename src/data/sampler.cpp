// Megatron-style GPT sample packing with per-epoch shuffles that are functions of (seed, epoch)
// alone, so every rank, and every resumed run, computes the same order without communicating.
#include "yuanmoe/data/sampler.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <utility>

namespace yuanmoe::data {

namespace {

/// SplitMix64: a tiny generator with a fixed, platform-independent output (unlike
/// std::shuffle / std::uniform_int_distribution, whose results differ between standard libraries).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, bound), without modulo bias.
  uint64_t below(uint64_t bound) {
    const uint64_t limit = std::numeric_limits<uint64_t>::max() -
                           std::numeric_limits<uint64_t>::max() % bound;
    uint64_t x;
    do x = next(); while (x >= limit);
    return x % bound;
  }

 private:
  uint64_t state_;
};

/// 0..n-1, Fisher-Yates shuffled by `rng`.
std::vector<int64_t> permutation(int64_t n, SplitMix64* rng) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  if (rng) {
    for (int64_t i = n - 1; i > 0; --i) {
      std::swap(p[i], p[rng->below(static_cast<uint64_t>(i) + 1)]);
    }
  }
  return p;
}

uint64_t mix(uint64_t seed, uint64_t epoch, uint64_t stream) {
  return SplitMix64(seed ^ SplitMix64(epoch * 2 + stream).next()).next();
}

}  // namespace

void to_json(nlohmann::json& j, const SamplerState& state) {
  j = nlohmann::json{{"seed", state.seed}, {"epoch", state.epoch}, {"cursor", state.cursor}};
}

void from_json(const nlohmann::json& j, SamplerState& state) {
  if (!j.is_object()) throw std::invalid_argument("sampler state: expected an object");
  const auto get = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) throw std::invalid_argument(std::string("sampler state: missing key \"") + key + "\"");
    const auto& value = j.at(key);
    if (!value.is_number_integer()) {
      throw std::invalid_argument(std::string("sampler state: \"") + key + "\" must be an integer");
    }
    return value;
  };
  state.seed = get("seed").get<uint64_t>();
  state.epoch = get("epoch").get<int64_t>();
  state.cursor = get("cursor").get<int64_t>();
}

GptSampler::GptSampler(std::shared_ptr<const IndexedDataset> dataset, const SamplerOptions& options)
    : dataset_(std::move(dataset)), options_(options) {
  if (!dataset_) throw std::invalid_argument("sampler: no dataset");
  const auto& o = options_;
  if (o.seq_length < 1) throw std::invalid_argument("sampler: seq_length must be >= 1, got " + std::to_string(o.seq_length));
  if (o.micro_batch_size < 1) {
    throw std::invalid_argument("sampler: micro_batch_size must be >= 1, got " + std::to_string(o.micro_batch_size));
  }
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    throw std::invalid_argument("sampler: rank " + std::to_string(o.rank) + " outside data-parallel size " +
                                std::to_string(o.world_size));
  }
  if (o.reset_position_ids && o.eod_id < 0) {
    throw std::invalid_argument("sampler: reset_position_ids needs an EOD id");
  }
  if (o.reset_attention_mask && o.eod_id < 0) {
    throw std::invalid_argument("sampler: reset_attention_mask needs an EOD id");
  }
  if (o.sft_loss_mask && (o.eod_id < 0 || o.sep_id < 0 || o.sep_id == o.eod_id)) {
    throw std::invalid_argument("sampler: the SFT loss mask needs distinct EOD and <sep> ids, got " +
                                std::to_string(o.eod_id) + " and " + std::to_string(o.sep_id));
  }
  const int64_t tokens = dataset_->num_tokens();
  if (tokens < o.seq_length + 1) {
    throw std::invalid_argument(dataset_->prefix() + ": dataset has " + std::to_string(tokens) +
                                " tokens, fewer than seq_length + 1 = " + std::to_string(o.seq_length + 1));
  }
  samples_per_epoch_ = (tokens - 1) / o.seq_length;
  state_.seed = o.seed;
}

void GptSampler::set_state(const SamplerState& state) {
  if (state.epoch < 0 || state.cursor < 0 || state.cursor >= samples_per_epoch_) {
    throw std::invalid_argument("sampler state: epoch " + std::to_string(state.epoch) + ", cursor " +
                                std::to_string(state.cursor) + " does not fit " + dataset_->prefix() +
                                " (" + std::to_string(samples_per_epoch_) + " samples per epoch)");
  }
  if (state.seed != state_.seed) built_epoch_ = -1;
  state_ = state;
}

void GptSampler::build_epoch(int64_t epoch) {
  if (epoch == built_epoch_) return;
  const int64_t n = dataset_->num_sequences();
  const uint64_t e = static_cast<uint64_t>(epoch);
  SplitMix64 sequence_rng(mix(state_.seed, e, 0));
  SplitMix64 sample_rng(mix(state_.seed, e, 1));
  order_ = permutation(n, options_.shuffle ? &sequence_rng : nullptr);
  starts_.assign(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) starts_[i + 1] = starts_[i] + dataset_->sequence_length(order_[i]);
  sample_order_ = permutation(samples_per_epoch_, options_.shuffle ? &sample_rng : nullptr);
  built_epoch_ = epoch;
}

void GptSampler::sample_tokens(int64_t epoch, int64_t index, int64_t* out, uint8_t* instruction) {
  if (index < 0 || index >= samples_per_epoch_) {
    throw std::out_of_range("sampler: sample " + std::to_string(index) + " outside the epoch of " +
                            std::to_string(samples_per_epoch_));
  }
  build_epoch(epoch);
  const int64_t start = sample_order_[index] * options_.seq_length;
  int64_t need = options_.seq_length + 1;
  // The last sequence whose first token is at or before `start` holds it (empty ones are skipped).
  auto j = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), start) - starts_.begin() - 1);
  int64_t offset = start - starts_[j];
  std::vector<int64_t> whole;
  std::vector<uint8_t> flags;
  while (need > 0) {
    const int64_t sequence = order_[j];
    const int64_t length = dataset_->sequence_length(sequence);
    const int64_t take = std::min(length - offset, need);
    if (instruction != nullptr) {
      // A token's flag depends on where (and whether) its document has a <sep>, which may lie
      // outside the window: the whole sequence is read (one memory-mapped copy).
      whole.resize(static_cast<size_t>(length));
      flags.resize(static_cast<size_t>(length));
      dataset_->read(sequence, 0, length, whole.data());
      instruction_tokens(whole.data(), length, options_.eod_id, options_.sep_id, flags.data());
      std::copy_n(flags.begin() + offset, take, instruction);
      std::copy_n(whole.begin() + offset, take, out);
      instruction += take;
    } else {
      dataset_->read(sequence, offset, take, out);
    }
    out += take;
    need -= take;
    offset = 0;
    ++j;
  }
}

BatchBuilder::BatchBuilder(int64_t micro_batch_size, int64_t seq_length)
    : seq_length_(seq_length),
      tokens_BS_(torch::empty({micro_batch_size, seq_length}, torch::kLong)),
      labels_BS_(torch::empty({micro_batch_size, seq_length}, torch::kLong)),
      positions_BS_(torch::empty({micro_batch_size, seq_length}, torch::kLong)) {}

void BatchBuilder::set_row(int64_t b, const std::vector<int64_t>& sample, const SamplerOptions& options,
                           const std::string& prefix, const std::vector<uint8_t>& instruction) {
  if (options.vocab_size > 0) {
    for (const int64_t token : sample) {
      if (token < 0 || token >= options.vocab_size) {
        throw std::runtime_error(prefix + ": token id " + std::to_string(token) +
                                 " is outside the model's vocabulary [0, " + std::to_string(options.vocab_size) +
                                 ") (model.vocab_size): data tokenized for another model?");
      }
    }
  }
  std::copy(sample.begin(), sample.end() - 1, tokens_BS_.data_ptr<int64_t>() + b * seq_length_);
  int64_t* labels = labels_BS_.data_ptr<int64_t>() + b * seq_length_;
  std::copy(sample.begin() + 1, sample.end(), labels);
  if (options.sft_loss_mask) {
    TORCH_CHECK(static_cast<int64_t>(instruction.size()) == seq_length_ + 1, "BatchBuilder: ", instruction.size(),
                " instruction flags for a sample of ", seq_length_ + 1, " tokens");
    for (int64_t i = 0; i < seq_length_; ++i) {
      if (instruction[static_cast<size_t>(i) + 1]) labels[i] = kIgnoredLabel;
    }
  }
  positions_BS_[b] = options.reset_position_ids ? reset_position_ids(tokens_BS_.slice(0, b, b + 1), options.eod_id)[0]
                                                : torch::arange(seq_length_, torch::kLong);
}

Batch BatchBuilder::finish(const SamplerOptions& options) const {
  const torch::Tensor documents =
      options.reset_attention_mask ? document_ids(tokens_BS_, options.eod_id) : torch::Tensor();
  return Batch{tokens_BS_, labels_BS_, positions_BS_, documents};
}

Batch GptSampler::next_batch() {
  const int64_t B = options_.micro_batch_size;
  const int64_t N = samples_per_epoch_;
  BatchBuilder batch(B, options_.seq_length);
  std::vector<int64_t> sample(static_cast<size_t>(options_.seq_length) + 1);
  std::vector<uint8_t> instruction(options_.sft_loss_mask ? sample.size() : 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t global = state_.cursor + options_.rank * B + b;
    sample_tokens(state_.epoch + global / N, global % N, sample.data(),
                  options_.sft_loss_mask ? instruction.data() : nullptr);
    batch.set_row(b, sample, options_, dataset_->prefix(), instruction);
  }
  state_.cursor += options_.world_size * B;
  while (state_.cursor >= N) {
    state_.cursor -= N;
    ++state_.epoch;
    spdlog::info("data: {} exhausted, starting epoch {} ({} samples per epoch)", dataset_->prefix(),
                 state_.epoch, N);
  }
  return batch.finish(options_);
}

namespace {

/// One scan over each row: the document of every token (0 from the row's first token, one more
/// after each EOD, so an EOD belongs to the document it ends) and its position in that document.
/// Both [B, S] int64.
std::pair<torch::Tensor, torch::Tensor> documents_and_positions(const torch::Tensor& tokens, int64_t eod_id,
                                                                 const char* caller) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong, caller,
              ": expected int64 tokens [B, S], got ", tokens.sizes());
  const torch::Tensor t = tokens.contiguous();
  const int64_t B = t.size(0);
  const int64_t S = t.size(1);
  torch::Tensor documents = torch::empty({B, S}, torch::kLong);
  torch::Tensor positions = torch::empty({B, S}, torch::kLong);
  const int64_t* in = t.data_ptr<int64_t>();
  int64_t* document_out = documents.data_ptr<int64_t>();
  int64_t* position_out = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t document = 0, position = 0;
    for (int64_t i = 0; i < S; ++i) {
      document_out[b * S + i] = document;
      position_out[b * S + i] = position;
      const bool eod = in[b * S + i] == eod_id;  // the next token starts the next document
      document += eod ? 1 : 0;
      position = eod ? 0 : position + 1;
    }
  }
  return {documents, positions};
}

}  // namespace

void instruction_tokens(const int64_t* tokens, int64_t n, int64_t eod_id, int64_t sep_id, uint8_t* flags) {
  int64_t begin = 0;  // of the current document
  while (begin < n) {
    int64_t end = begin;  // one past its EOD, or n
    int64_t sep = -1;     // its first <sep>
    while (end < n) {
      const int64_t token = tokens[end++];
      if (token == sep_id && sep < 0) sep = end - 1;
      if (token == eod_id) break;
    }
    for (int64_t i = begin; i < end; ++i) flags[i] = sep >= 0 && i < sep ? 1 : 0;
    begin = end;
  }
}

torch::Tensor reset_position_ids(const torch::Tensor& tokens, int64_t eod_id) {
  return documents_and_positions(tokens, eod_id, "reset_position_ids").second;
}

torch::Tensor document_ids(const torch::Tensor& tokens, int64_t eod_id) {
  return documents_and_positions(tokens, eod_id, "document_ids").first;
}

}  // namespace yuanmoe::data
