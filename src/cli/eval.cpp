// `yuanmoe eval --checkpoint DIR [--data PREFIX] [--steps N] [--loss-mask none|sft] [--dump-logits FILE]`
#include <cxxopts.hpp>
#include <iostream>
#include <optional>

#include "yuanmoe/checkpoint/model_loader.h"
#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/cli/commands.h"
#include "yuanmoe/train/evaluate.h"

namespace yuanmoe::cli {

int run_eval(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe eval", "Validation loss, perplexity and per-expert load of a checkpoint.");
  options.add_options()
      ("checkpoint", kCheckpointOptionHelp, cxxopts::value<std::string>())
      ("data", "dataset prefix (default: the checkpoint's data.valid_prefix)", cxxopts::value<std::string>())
      ("steps", "micro-batches to evaluate (default: the checkpoint's train.eval_steps)", cxxopts::value<int64_t>())
      ("loss-mask", "none or sft: which labels the loss counts (default: the checkpoint's data.loss_mask)",
       cxxopts::value<std::string>())
      ("dump-logits", "write the first batch's logits, tokens, labels (-100: ignored), positions and document ids "
       "as safetensors", cxxopts::value<std::string>());
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("checkpoint")) throw std::invalid_argument("--checkpoint DIR is required");
  checkpoint::LoadedModel loaded = checkpoint::load_model(args["checkpoint"].as<std::string>());
  const config::RunConfig& run = loaded.config;
  const std::string prefix = args.count("data") ? args["data"].as<std::string>() : run.data.valid_prefix;
  if (prefix.empty()) throw std::invalid_argument("--data PREFIX is required: the checkpoint's config has no data.valid_prefix");
  const int64_t steps = args.count("steps") ? args["steps"].as<int64_t>() : run.train.eval_steps;
  if (steps <= 0) throw std::invalid_argument("--steps must be positive, got " + std::to_string(steps));

  std::optional<config::LossMask> loss_mask;
  if (args.count("loss-mask")) {  // spelled as data.loss_mask is in a config
    const std::string name = args["loss-mask"].as<std::string>();
    for (const auto& [mask, spelling] : config::enum_names<config::LossMask>()) {
      if (name == spelling) loss_mask = mask;
    }
    if (!loss_mask) throw std::invalid_argument("--loss-mask: expected none or sft, got '" + name + "'");
  }
  data::SamplerOptions sampler = train::sampler_options(run, prefix, loss_mask);
  if (sampler.eod_id < 0) sampler.reset_position_ids = sampler.reset_attention_mask = false;  // data made elsewhere, EOD unknown
  auto dataset = std::make_shared<const data::IndexedDataset>(prefix);

  const std::string dump_path = args.count("dump-logits") ? args["dump-logits"].as<std::string>() : "";
  const auto dump = [&](const data::Batch& batch, const torch::Tensor& logits) {
    // Document ids whether or not the attention uses them, so a loss mask can be checked per document.
    const torch::Tensor document_ids = batch.document_ids.defined() ? batch.document_ids
                                       : sampler.eod_id >= 0        ? data::document_ids(batch.tokens, sampler.eod_id)
                                                                    : torch::zeros_like(batch.tokens);
    checkpoint::write_safetensors(dump_path,
                                  {{"logits", logits.to(torch::kFloat)},
                                   {"tokens", batch.tokens},
                                   {"labels", batch.labels},
                                   {"position_ids", batch.position_ids},
                                   {"document_ids", document_ids}},
                                  {{"checkpoint", loaded.dir.string()},
                                   {"data", prefix},
                                   {"loss_mask", sampler.sft_loss_mask ? "sft" : "none"}});
  };
  const train::EvalResult result =
      train::evaluate(*loaded.model, dataset, sampler, steps, run.train.precision,
                      dump_path.empty() ? std::function<void(const data::Batch&, const torch::Tensor&)>() : dump);

  std::printf("checkpoint: %s (step %lld)\ndata:       %s\n", loaded.dir.c_str(),
              static_cast<long long>(loaded.progress.step), prefix.c_str());
  std::printf("loss mask:  %s\n", sampler.sft_loss_mask ? "sft (response labels only)" : "none");
  std::printf("valid loss: %.4f\nperplexity: %.2f\ntokens:     %lld in %lld batches\n", result.loss,
              result.perplexity, static_cast<long long>(result.tokens), static_cast<long long>(result.batches));
  if (result.expert_share_LE.defined()) {
    std::printf("expert load (share of routed tokens; uniform = %.4f):\n", 1.0 / run.moe.num_experts);
    for (int64_t l = 0; l < result.expert_share_LE.size(0); ++l) {
      const torch::Tensor row = result.expert_share_LE[l];
      std::printf("  MoE layer %lld: min %.4f  max %.4f  max/uniform %.2f\n", static_cast<long long>(l),
                  row.min().item<double>(), row.max().item<double>(),
                  row.max().item<double>() * run.moe.num_experts);
    }
  }
  if (!dump_path.empty()) std::printf("logits:     %s\n", dump_path.c_str());
  return 0;
}

}  // namespace yuanmoe::cli
