// `yuanmoe export-hf --checkpoint DIR --output DIR [--dtype fp32|bf16] [--max-shard-size 5GB]`
// `yuanmoe import-hf --input DIR --output DIR [--rope-base B] [--rope-tables exact|hf_bf16|megatron_bf16]`
// Both write into a fresh directory only; docs/interop.md describes the mapping.
#include <cxxopts.hpp>
#include <cstdio>
#include <fstream>

#include "yuanmoe/checkpoint/hf_files.h"
#include "yuanmoe/checkpoint/hf_format.h"
#include "yuanmoe/checkpoint/model_loader.h"
#include "yuanmoe/cli/commands.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/data/tokenizer.h"

namespace yuanmoe::cli {

namespace fs = std::filesystem;

namespace {

/// Refuses to write over anything: the output must not exist or be an empty directory.
void require_fresh_output(const fs::path& output) {
  if (fs::exists(output) && (!fs::is_directory(output) || !fs::is_empty(output))) {
    throw std::invalid_argument(output.string() + ": already exists and is not an empty directory (nothing was written)");
  }
}

int64_t total_bytes(const checkpoint::NamedTensors& tensors) {
  int64_t bytes = 0;
  for (const auto& [name, t] : tensors) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes;
}

}  // namespace

int run_export_hf(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe export-hf", "Write a checkpoint in the Hugging Face Yuan2-M32-hf layout.");
  options.add_options()
      ("checkpoint", kCheckpointOptionHelp, cxxopts::value<std::string>())
      ("output", "new directory for config.json, the safetensors weights and tokenizer.model", cxxopts::value<std::string>())
      ("dtype", "weight dtype: fp32 or bf16 (the published model's)", cxxopts::value<std::string>()->default_value("fp32"))
      ("max-shard-size", "largest safetensors shard, e.g. 5GB, 500MB", cxxopts::value<std::string>()->default_value("5GB"));
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("checkpoint")) throw std::invalid_argument("--checkpoint DIR is required");
  if (!args.count("output")) throw std::invalid_argument("--output DIR is required");
  const std::string dtype_name = args["dtype"].as<std::string>();
  if (dtype_name != "fp32" && dtype_name != "bf16") {
    throw std::invalid_argument("--dtype: expected fp32 or bf16, got '" + dtype_name + "'");
  }
  const c10::ScalarType dtype = dtype_name == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  const uint64_t max_shard_bytes = checkpoint::parse_byte_size(args["max-shard-size"].as<std::string>());
  const fs::path output = fs::absolute(args["output"].as<std::string>()).lexically_normal();
  require_fresh_output(output);

  const checkpoint::LoadedModel loaded = checkpoint::load_model(args["checkpoint"].as<std::string>());
  const config::RunConfig& run = loaded.config;
  int64_t eod_id = run.data.eod_id;
  if (eod_id < 0 && !loaded.tokenizer.empty()) eod_id = data::Tokenizer(loaded.tokenizer.string()).eod_id();
  const checkpoint::NamedTensors hf =
      checkpoint::to_hf_state(checkpoint::model_state(*loaded.model), run.model, run.moe, dtype);

  // Written beside the target and renamed when complete, like a checkpoint.
  const fs::path staging = output.parent_path() / ("." + output.filename().string() + ".tmp-export");
  fs::remove_all(staging);
  fs::create_directories(staging);
  const std::vector<std::string> files = checkpoint::write_hf_weights(staging, hf, max_shard_bytes);
  {
    std::ofstream out(staging / "config.json");
    out << checkpoint::make_hf_config(run, eod_id, dtype).dump(2) << "\n";
    if (!out) throw std::runtime_error((staging / "config.json").string() + ": write failed");
  }
  if (!loaded.tokenizer.empty()) fs::copy_file(loaded.tokenizer, staging / "tokenizer.model");
  if (fs::exists(output)) fs::remove(output);  // an empty directory (checked above)
  fs::rename(staging, output);

  std::printf("exported %s (step %lld) -> %s\n", loaded.dir.c_str(), static_cast<long long>(loaded.progress.step),
              output.c_str());
  std::printf("tensors:  %zu (%s, %s bytes) in %zu weight file(s)\n", hf.size(), dtype_name.c_str(),
              with_thousands(total_bytes(hf)).c_str(), files.size() - (files.size() > 1 ? 1 : 0));
  std::printf("router:   %s; rope base %g (config.json rotary_base; the HF modelling code assumes 10000)\n",
              config::to_string(run.moe.router).c_str(), run.model.rope_base);
  if (loaded.tokenizer.empty()) std::printf("tokenizer: none in the checkpoint, not copied\n");
  return 0;
}

int run_import_hf(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe import-hf",
                           "Turn a Hugging Face Yuan2-M32 directory (safetensors or .bin, sharded or not) into a "
                           "checkpoint for eval, generate and train.init_from.");
  options.add_options()
      ("input", "HF model directory: config.json + weights (+ tokenizer.model)", cxxopts::value<std::string>())
      ("output", "new checkpoints directory (gets step_00000000 and latest)", cxxopts::value<std::string>())
      ("rope-base", "RoPE base to record (default: config.json rotary_base / rope_theta, else 10000; "
                    "the released M32 weights were fine-tuned at 40890)", cxxopts::value<double>())
      ("rope-tables", "exact, hf_bf16 (reproduce the HF code's bf16 RoPE) or megatron_bf16 (docs/interop.md)",
       cxxopts::value<std::string>()->default_value("exact"));
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("input")) throw std::invalid_argument("--input DIR is required");
  if (!args.count("output")) throw std::invalid_argument("--output DIR is required");
  const fs::path input = args["input"].as<std::string>();
  const fs::path output = args["output"].as<std::string>();
  require_fresh_output(output);
  std::optional<double> rope_base;
  if (args.count("rope-base")) {
    rope_base = args["rope-base"].as<double>();
    if (!(*rope_base > 0)) throw std::invalid_argument("--rope-base must be positive");
  }

  const std::string config_path = (input / "config.json").string();
  const checkpoint::HfArchitecture arch =
      checkpoint::parse_hf_config(config::read_json_file(config_path), config_path, rope_base);
  // The imported checkpoint's run config: the architecture from config.json; the train and data
  // sections are placeholders that a fine-tune config replaces (only architecture keys must match).
  config::RunConfig run;
  run.model = arch.model;
  const std::string tables = args["rope-tables"].as<std::string>();
  bool known_tables = false;
  for (const auto& [value, name] : config::enum_names<config::RopeTables>()) {
    if (tables == name) {
      run.model.rope_tables = value;
      known_tables = true;
    }
  }
  if (!known_tables) throw std::invalid_argument("--rope-tables: expected exact, hf_bf16 or megatron_bf16, got '" + tables + "'");
  run.moe = arch.moe;
  run.train.seq_length = run.model.max_seq_length;
  run.train.max_steps = 1;
  run.data.eod_id = arch.eod_id;
  if (auto issues = config::validate(run); !issues.empty()) {
    for (auto& issue : issues) issue.message += " (derived from config.json)";
    throw config::ConfigError(config_path, issues);
  }

  const checkpoint::NamedTensors hf = checkpoint::read_hf_weights(input);
  checkpoint::NamedTensors state = checkpoint::from_hf_state(hf, run.model, run.moe, input.string());
  // Through the real module, so the names are exactly what eval and init_from will ask for.
  model::Transformer model(run.model, run.moe);
  checkpoint::load_model_state(*model, state, input.string());

  checkpoint::Checkpoint ck;
  ck.config = run;
  ck.model = checkpoint::model_state(*model);
  if (fs::exists(input / "tokenizer.model")) ck.tokenizer = input / "tokenizer.model";
  const fs::path dir = checkpoint::save_checkpoint(output, ck, /*keep_last=*/1);

  std::printf("imported %s -> %s\n", input.c_str(), dir.c_str());
  std::printf("tensors:  %zu HF tensors (%s) -> %zu ours (fp32)\n", hf.size(),
              hf.empty() ? "-" : c10::toString(hf.front().second.scalar_type()), ck.model.size());
  std::printf("model:    %lld layers, hidden %lld, %lld experts top-%lld, %s router, rope base %g\n",
              static_cast<long long>(run.model.num_layers), static_cast<long long>(run.model.hidden_size),
              static_cast<long long>(run.moe.num_experts), static_cast<long long>(run.moe.top_k),
              config::to_string(run.moe.router).c_str(), run.model.rope_base);
  if (ck.tokenizer.empty()) std::printf("tokenizer: none in %s, not copied\n", input.c_str());
  return 0;
}

}  // namespace yuanmoe::cli
