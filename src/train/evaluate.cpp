#include "yuanmoe/train/evaluate.h"

#include <algorithm>
#include <cmath>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/data/prepare.h"
#include "yuanmoe/data/tokenizer.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/precision.h"
#include "yuanmoe/train/token_layout.h"

namespace yuanmoe::train {

data::SamplerOptions sampler_options(const config::RunConfig& run, const std::string& prefix,
                                     std::optional<config::LossMask> loss_mask) {
  data::SamplerOptions options;
  options.seq_length = run.train.seq_length;
  options.micro_batch_size = run.train.micro_batch_size;
  options.seed = static_cast<uint64_t>(run.train.seed);
  options.reset_position_ids = run.data.reset_position_ids;
  options.reset_attention_mask = run.data.reset_attention_mask;
  options.eod_id = run.data.eod_id;
  options.vocab_size = run.model.vocab_size;
  if (options.eod_id < 0) {
    if (auto meta = data::load_dataset_meta(prefix)) options.eod_id = meta->eod_id;
  }
  if (options.eod_id < 0 && !run.data.tokenizer.empty()) {
    // Data made by other tools (Megatron's preprocess_data.py writes no .meta.json): -1 means the
    // id of data.tokenizer, as docs/data.md says: its <eod> piece, else its EOS.
    const data::Tokenizer tokenizer(run.data.tokenizer);
    options.eod_id = tokenizer.eod_id();
    spdlog::info("data.eod_id -1: {} has no .meta.json; using {} = {} of {}", prefix,
                 tokenizer.eod_id() == tokenizer.eos_id() ? "its EOS" : "<eod>", options.eod_id, run.data.tokenizer);
  }
  if (loss_mask.value_or(run.data.loss_mask) == config::LossMask::kSft) {
    options.sft_loss_mask = true;
    options.sep_id = run.data.sep_id;
    if (options.sep_id < 0) {
      if (auto meta = data::load_dataset_meta(prefix)) options.sep_id = meta->sep_id;
    }
    if (options.sep_id < 0 && !run.data.tokenizer.empty()) options.sep_id = data::Tokenizer(run.data.tokenizer).sep_id();
    if (options.sep_id < 0 || options.eod_id < 0) {
      throw config::ConfigError(
          "config", {{options.sep_id < 0 ? "data.sep_id" : "data.eod_id",
                      "unknown for " + prefix + ", whose instruction the SFT loss mask hides: set it, or data.tokenizer "
                      "(a model with <sep> and <eod> pieces), or prepare the data with yuanmoe prepare-data --format "
                      "sft-text or sft-jsonl (its .meta.json names them)"}});
    }
  }
  return options;
}

Tensor expert_share(const Tensor& routed_pairs_LE) {
  const Tensor counts = routed_pairs_LE.to(torch::kCPU, torch::kDouble);
  return counts / counts.sum(1, /*keepdim=*/true).clamp_min(1.0);
}

EvalResult evaluate(const EvalForward& forward,
                    std::shared_ptr<const data::IndexedDataset> dataset,
                    data::SamplerOptions options,
                    int64_t steps,
                    const std::function<void(const data::Batch&, const Tensor&)>& on_first_batch) {
  options.shuffle = false;
  data::GptSampler sampler(std::move(dataset), options);
  const int64_t batches = std::clamp<int64_t>(sampler.samples_per_epoch() / options.micro_batch_size, 1, steps);
  torch::NoGradGuard no_grad;
  EvalResult result;
  for (int64_t i = 0; i < batches; ++i) {
    const data::Batch batch = sampler.next_batch();
    const model::ModelOutput out = forward(batch);
    const int64_t counted = counted_labels(batch.labels);
    if (out.out.defined()) {
      const Tensor labels = batch.labels.to(out.out.device());
      result.loss_sum += language_model_loss(out.out, labels).item<double>() * static_cast<double>(counted);
      if (i == 0 && on_first_batch) on_first_batch(batch, out.out);
    }
    result.tokens += counted;
    if (out.routed_pairs_LE.defined()) {
      const Tensor pairs = out.routed_pairs_LE.to(torch::kCPU);
      result.routed_pairs_LE = result.routed_pairs_LE.defined() ? result.routed_pairs_LE + pairs : pairs;
    }
  }
  result.batches = batches;
  result.finish();
  return result;
}

void EvalResult::finish() {
  loss = loss_sum / static_cast<double>(tokens);
  perplexity = std::exp(loss);
  if (routed_pairs_LE.defined()) expert_share_LE = expert_share(routed_pairs_LE);
}

EvalResult blend_eval_result(const std::vector<EvalResult>& sources, const std::vector<double>& weights) {
  TORCH_CHECK(sources.size() == weights.size(), "blend_eval_result: ", sources.size(), " results, ", weights.size(),
              " weights");
  EvalResult out;
  if (sources.empty()) return out;
  double weighted_loss = 0.0, weight_sum = 0.0;
  for (size_t j = 0; j < sources.size(); ++j) {
    const EvalResult& r = sources[j];
    weighted_loss += weights[j] * r.loss;
    weight_sum += weights[j];
    out.loss_sum += r.loss_sum;
    out.tokens += r.tokens;
    out.batches += r.batches;
    if (r.routed_pairs_LE.defined()) {
      out.routed_pairs_LE = out.routed_pairs_LE.defined() ? out.routed_pairs_LE + r.routed_pairs_LE : r.routed_pairs_LE;
    }
  }
  out.loss = weighted_loss / weight_sum;
  out.perplexity = std::exp(out.loss);
  if (out.routed_pairs_LE.defined()) out.expert_share_LE = expert_share(out.routed_pairs_LE);
  return out;
}

EvalResult evaluate(model::TransformerImpl& model,
                    std::shared_ptr<const data::IndexedDataset> dataset,
                    data::SamplerOptions options,
                    int64_t steps,
                    config::Precision precision,
                    const std::function<void(const data::Batch&, const Tensor&)>& on_first_batch) {
  const bool was_training = model.is_training();
  model.eval();
  const torch::Device device = model.parameters().front().device();
  const EvalResult result = evaluate(
      [&](const data::Batch& batch) {
        AutocastScope autocast(precision, device);
        return model.forward(batch.tokens.to(device), token_layout(batch, device));
      },
      std::move(dataset), options, steps, on_first_batch);
  model.train(was_training);
  return result;
}

}  // namespace yuanmoe::train
