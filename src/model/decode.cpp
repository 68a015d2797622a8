#include "yuanmoe/model/decode.h"

#include <ATen/CPUGeneratorImpl.h>

namespace yuanmoe::model {
namespace {

/// Eval mode for the guard's lifetime; the previous mode comes back even when generation throws.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(torch::nn::Module& module)
      : module_(module), was_training_(module.is_training()) {
    module_.eval();
  }
  ~EvalModeGuard() { module_.train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  torch::nn::Module& module_;
  const bool was_training_;
};

}  // namespace

int64_t sample_token(const Tensor& logits_V, const SamplingOptions& options, at::Generator& generator) {
  // On the CPU, so that one CPU generator serves every device; each step syncs for EOS anyway.
  const Tensor logits = logits_V.to(torch::kCPU, at_least_fp32(logits_V));
  if (options.temperature == 0) return logits.argmax().item<int64_t>();
  Tensor candidates_V = logits, token_ids_V;  // token_ids_V undefined: index = token id
  if (options.top_k > 0 && options.top_k < logits.size(0)) {
    std::tie(candidates_V, token_ids_V) = logits.topk(options.top_k);
  }
  const Tensor probs_V = torch::softmax(candidates_V / options.temperature, 0);
  const int64_t pick = torch::multinomial(probs_V, 1, /*replacement=*/false, generator).item<int64_t>();
  return token_ids_V.defined() ? token_ids_V[pick].item<int64_t>() : pick;
}

std::vector<int64_t> generate(TransformerImpl& model,
                              const std::vector<int64_t>& prompt,
                              const SamplingOptions& options) {
  TORCH_CHECK(model.stage.has_embedding && model.stage.has_head,
              "generate() needs the whole model (embedding and head), got a pipeline stage");
  TORCH_CHECK(!prompt.empty(), "generate() needs a prompt of at least one token");
  TORCH_CHECK(options.max_new_tokens >= 0, "max_new_tokens must be >= 0, got ",
              options.max_new_tokens);
  TORCH_CHECK(options.temperature >= 0, "temperature must be >= 0 (0 = greedy), got ",
              options.temperature);
  TORCH_CHECK(options.top_k >= 0, "top_k must be >= 0 (0 = no truncation), got ", options.top_k);
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  TORCH_CHECK(total <= model.config.max_seq_length, "prompt (", prompt.size(),
              " tokens) + max_new_tokens (", options.max_new_tokens, ") = ", total,
              " exceeds model.max_seq_length (", model.config.max_seq_length,
              "); shorten the prompt or lower max_new_tokens");
  for (const int64_t id : prompt) {
    TORCH_CHECK(id >= 0 && id < model.config.vocab_size, "prompt token id ", id,
                " is outside the vocabulary [0, ", model.config.vocab_size, ")");
  }

  torch::NoGradGuard no_grad;
  EvalModeGuard eval_mode(model);
  at::Generator generator = at::detail::createCPUGenerator(options.seed);
  const auto ids_options = torch::dtype(torch::kLong).device(model.embed_tokens->weight.device());

  DecodeCache cache(model);
  Tensor input_BS = torch::tensor(prompt, torch::kLong).view({1, -1}).to(ids_options.device());
  std::vector<int64_t> generated;
  while (static_cast<int64_t>(generated.size()) < options.max_new_tokens) {
    // Absolute positions: the chunk continues the cached sequence (plain arange, docs/model.md §4.2).
    const int64_t seq = input_BS.size(1);
    const Tensor position_ids_BS =
        torch::arange(cache.num_tokens, cache.num_tokens + seq, ids_options).unsqueeze(0);
    const Tensor logits_BSV = model.forward(input_BS, TokenLayout{position_ids_BS}, &cache).out;  // one document
    const int64_t next = sample_token(logits_BSV[0][seq - 1], options, generator);
    generated.push_back(next);
    if (next == options.eos_id) break;
    input_BS = torch::full({1, 1}, next, ids_options);
  }
  return generated;
}

}  // namespace yuanmoe::model
