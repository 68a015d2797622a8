// GPT pretraining batches from an indexed dataset, Megatron style: the sequences of an epoch are
// shuffled and concatenated into one token stream (documents end in EOD), the stream is cut into
// samples of seq_length + 1 tokens that overlap by one token (the last label of sample k is the
// first input of sample k + 1), and the samples of the epoch are shuffled again. Data-parallel
// rank r of n takes its micro-batch from each block of n * micro_batch_size consecutive samples,
// so ranks never overlap and the consumed-samples count is the same on every rank.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <vector>

#include "yuanmoe/data/indexed_dataset.h"

namespace yuanmoe::data {

/// The label of a token whose prediction does not count (PyTorch's and Hugging Face's
/// ignore_index): the instruction of an SFT sample (SamplerOptions::sft_loss_mask).
constexpr int64_t kIgnoredLabel = -100;

/// Everything needed to resume exactly where a run stopped (saved in checkpoints). It does not
/// depend on the data-parallel layout: `cursor` counts samples of the epoch consumed by all ranks.
struct SamplerState {
  uint64_t seed = 0;   ///< seeds the per-epoch sequence and sample permutations
  int64_t epoch = 0;   ///< current pass over the data, from 0
  int64_t cursor = 0;  ///< samples of `epoch` already consumed, all ranks together

  bool operator==(const SamplerState& other) const {
    return seed == other.seed && epoch == other.epoch && cursor == other.cursor;
  }
};

void to_json(nlohmann::json& j, const SamplerState& state);
/// Throws std::invalid_argument naming the key when one is missing or has the wrong type.
void from_json(const nlohmann::json& j, SamplerState& state);

struct SamplerOptions {
  int64_t seq_length = 0;        ///< S: tokens per sample fed to the model
  int64_t micro_batch_size = 1;  ///< B: samples per batch on this rank
  int64_t rank = 0;              ///< data-parallel rank r
  int64_t world_size = 1;        ///< data-parallel size n
  uint64_t seed = 0;
  bool shuffle = true;  ///< false: sequences in file order, samples in stream order (evaluation)
  /// Position ids restart at 0 after every EOD token (documents packed in one sample do not see
  /// each other's positions); needs eod_id.
  bool reset_position_ids = false;
  /// Each batch also carries document ids (document_ids below), with which a token attends only to
  /// earlier tokens of its own document (Megatron's --reset-attention-mask); needs eod_id.
  bool reset_attention_mask = false;
  int64_t eod_id = -1;
  /// data.loss_mask = sft: the labels of instruction tokens are kIgnoredLabel (instruction_tokens
  /// below; docs/data.md, "Loss masks"); needs eod_id and sep_id.
  bool sft_loss_mask = false;
  int64_t sep_id = -1;
  /// > 0: every token must be in [0, vocab_size); next_batch() throws naming the dataset, the
  /// value and the document otherwise (data tokenized for another model would index past the
  /// embedding).
  int64_t vocab_size = 0;
};

/// One micro-batch, every tensor [B, S] int64 on the CPU.
struct Batch {
  torch::Tensor tokens;        ///< model input
  /// tokens shifted left by one: labels[b][i] = stream[i + 1], or kIgnoredLabel where masked
  torch::Tensor labels;
  torch::Tensor position_ids;  ///< 0..S-1, or reset after each EOD when requested
  torch::Tensor document_ids;  ///< with reset_attention_mask only (else undefined): document_ids()
};

/// Assembles one micro-batch from samples of seq_length + 1 tokens, for both samplers (this one
/// and blend.h's): tokens and labels from each sample, its ids checked against the vocabulary,
/// position ids by the options of the dataset it came from, document ids for the whole batch.
class BatchBuilder {
 public:
  BatchBuilder(int64_t micro_batch_size, int64_t seq_length);
  /// Row b from `sample` (seq_length + 1 ids read from the dataset at `prefix` with `options`).
  /// With options.sft_loss_mask, `instruction` holds the sample's seq_length + 1 flags
  /// (GptSampler::sample_tokens): label i is ignored where instruction[i + 1] is set.
  /// Throws std::runtime_error naming the prefix when an id is outside [0, options.vocab_size).
  void set_row(int64_t b, const std::vector<int64_t>& sample, const SamplerOptions& options, const std::string& prefix,
               const std::vector<uint8_t>& instruction = {});
  /// The batch; document ids when `options.reset_attention_mask` (the rows' datasets share the
  /// EOD id).
  Batch finish(const SamplerOptions& options) const;

 private:
  int64_t seq_length_;
  torch::Tensor tokens_BS_, labels_BS_, positions_BS_;
};

class GptSampler {
 public:
  /// Throws std::invalid_argument for bad options and when the dataset holds fewer than
  /// seq_length + 1 tokens (the message names the dataset).
  GptSampler(std::shared_ptr<const IndexedDataset> dataset, const SamplerOptions& options);

  /// The next micro-batch of this rank; advances the state by world_size * micro_batch_size
  /// samples, starting a new epoch (logged) when the current one runs out.
  Batch next_batch();

  const SamplerState& state() const { return state_; }
  /// Resumes from a saved state; throws std::invalid_argument when the cursor does not fit this
  /// dataset and sequence length.
  void set_state(const SamplerState& state);

  /// Samples in one epoch: (tokens - 1) / seq_length; the stream's tail shorter than a sample is
  /// not used in that epoch (it is in others, where the order differs).
  int64_t samples_per_epoch() const { return samples_per_epoch_; }
  /// The dataset's prefix (for messages).
  const std::string& prefix() const { return dataset_->prefix(); }
  /// The seq_length + 1 tokens of sample `index` (in shuffled order) of `epoch`, into `out`; with
  /// `instruction` (options.sft_loss_mask), their instruction_tokens flags too, each read from its
  /// whole document, so a document cut by the window is masked as it would be whole.
  void sample_tokens(int64_t epoch, int64_t index, int64_t* out, uint8_t* instruction = nullptr);

 private:
  void build_epoch(int64_t epoch);

  std::shared_ptr<const IndexedDataset> dataset_;
  SamplerOptions options_;
  SamplerState state_;
  int64_t samples_per_epoch_ = 0;
  // The epoch whose tables are built: sequence order, prefix sums of its lengths, sample order.
  int64_t built_epoch_ = -1;
  std::vector<int64_t> order_;
  std::vector<int64_t> starts_;
  std::vector<int64_t> sample_order_;
};

/// The instruction tokens of data.loss_mask = sft (docs/data.md, "Loss masks"), whose labels the
/// loss ignores: flags[i] = 1 when tokens[i] comes before the first <sep> of its document. An SFT
/// document is instruction, <sep>, response, EOD; documents end after each EOD and at n (the end
/// of a dataset sequence). The <sep> and EOD themselves are not instruction tokens (their labels
/// count, as in the official Yuan code), and a document without <sep> has none: pretraining text
/// in the same mix learns every token.
void instruction_tokens(const int64_t* tokens, int64_t n, int64_t eod_id, int64_t sep_id, uint8_t* flags);

/// position_ids [B, S] for tokens [B, S] int64: 0, 1, 2, ... restarting at 0 on the token after
/// each `eod_id`.
torch::Tensor reset_position_ids(const torch::Tensor& tokens, int64_t eod_id);

/// document_ids [B, S] for tokens [B, S] int64: 0 from each row's first token, one more on the
/// token after each `eod_id` (the EOD belongs to the document it ends), so a new document starts
/// exactly where reset_position_ids restarts at 0.
torch::Tensor document_ids(const torch::Tensor& tokens, int64_t eod_id);

}  // namespace yuanmoe::data
