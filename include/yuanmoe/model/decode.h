// Incremental decoding (docs/architecture.md, "Incremental decoding"): the per-layer state that
// lets a chunk of tokens continue a sequence without recomputing it, and token sampling on top of
// it. The state is the KV cache plus the LFA's previous frames (option 2 of docs/model.md §10),
// exact for chunks of any length, so chunked prefill and one-token steps give the full forward's
// logits. The forwards take the
// cache as an optional pointer; there is no second model. Not here: paged or preallocated caches,
// batched generation of prompts with different lengths, beam search.
// T below is the number of tokens cached so far.
#pragma once

#include <vector>

#include "yuanmoe/core/types.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {

/// The LFA's two causal filters look one frame back (docs/model.md §3); these are the frames before the next
/// chunk. Both undefined at sequence start, which the filters read as the zero frame.
struct LfaState {
  Tensor a_prev;   ///< [B, 1, D]   last LFA input (input-norm output) seen
  Tensor y1_prev;  ///< [B, 1, D/2] last first-conv output seen
};

/// One layer's decode state. Undefined tensors = nothing cached yet.
struct LayerCache {
  Tensor k_BHTDh;  ///< keys after RoPE, [B, H, T, Dh]
  Tensor v_BHTDh;  ///< values, [B, H, T, Dh]
  LfaState lfa;    ///< unused when the model has no LFA
};

/// The decode state of a model or pipeline stage: one LayerCache per layer it holds, in layer
/// order, and the number of tokens processed so far (every row of the batch has the same).
/// Example:
///   DecodeCache cache(*model);
///   model->forward(prompt_BS, default_position_ids(B, S), &cache);        // prefill
///   model->forward(next_B1, torch::full({B, 1}, cache.num_tokens), &cache);  // one step
struct DecodeCache {
  explicit DecodeCache(const TransformerImpl& model) : layers(model.blocks.size()) {}

  std::vector<LayerCache> layers;
  int64_t num_tokens = 0;
};

/// How generate() picks each token.
struct SamplingOptions {
  int64_t max_new_tokens = 32;  ///< upper bound on the generated tokens
  double temperature = 1.0;     ///< 0 = greedy (argmax); otherwise softmax(logits / temperature)
  int64_t top_k = 0;            ///< sample among the k largest logits; 0 = the whole vocabulary
  int64_t eos_id = -1;          ///< stop after generating this id; -1 = none
  uint64_t seed = 0;            ///< seed of generate()'s own generator (the global one is untouched)
};

/// Picks one token id from logits_V ([V], any float dtype, any device) as `options` says.
/// Greedy never draws from the generator.
int64_t sample_token(const Tensor& logits_V, const SamplingOptions& options, at::Generator& generator);

/// Generates up to options.max_new_tokens ids after `prompt` (batch 1): the whole prompt is
/// prefilled as one chunk, then one token per step through a DecodeCache, with absolute positions.
/// Returns the generated ids only; an EOS ends the result. Runs without gradients and in eval mode,
/// restoring the model's previous mode. Requires the whole model (embedding and head) and
/// prompt.size() + max_new_tokens <= config.max_seq_length (checked before any work).
std::vector<int64_t> generate(TransformerImpl& model,
                              const std::vector<int64_t>& prompt,
                              const SamplingOptions& options);

}  // namespace yuanmoe::model
