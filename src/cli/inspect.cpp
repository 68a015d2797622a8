// `yuanmoe inspect`: the resolved config, parameter counts and FLOPs per token, computed from the
// config alone (no weights are allocated, so the 40B config is instant).
#include <cxxopts.hpp>
#include <iostream>

#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/cli/commands.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/model/param_count.h"

namespace yuanmoe::cli {

std::optional<cxxopts::ParseResult> parse_or_help(cxxopts::Options& options, int argc, const char* const* argv) {
  options.add_options()("h,help", "show this help");
  cxxopts::ParseResult args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return std::nullopt;
  }
  return args;
}

std::string with_thousands(int64_t value) {
  std::string digits = std::to_string(value < 0 ? -value : value);
  for (int i = static_cast<int>(digits.size()) - 3; i > 0; i -= 3) digits.insert(i, ",");
  return value < 0 ? "-" + digits : digits;
}

int run_inspect(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe inspect",
                           "Print the resolved config, parameter counts and FLOPs per token.");
  options.add_options()
      ("config", "JSON config file", cxxopts::value<std::string>())
      ("checkpoint", kCheckpointOptionHelp, cxxopts::value<std::string>())
      ("set", "override a config key, e.g. --set moe.router=linear (repeatable)",
       cxxopts::value<std::vector<std::string>>());
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (args.count("config") == args.count("checkpoint")) {
    throw std::invalid_argument("exactly one of --config FILE and --checkpoint DIR is required");
  }
  std::string path;
  config::RunConfig run;
  nlohmann::ordered_json manifest;
  if (args.count("checkpoint")) {
    // Metadata only: the manifest is verified, the weights are not read.
    const auto dir = checkpoint::resolve_checkpoint_dir(args["checkpoint"].as<std::string>());
    path = (dir / "manifest.json").string();
    manifest = checkpoint::read_manifest(dir);
    config::ParseResult parsed = config::parse_config(nlohmann::json::parse(manifest["config"].dump()));
    if (!parsed.issues.empty()) throw config::ConfigError(path + " (config)", parsed.issues);
    run = parsed.config;
  } else {
    path = args["config"].as<std::string>();
    const std::vector<std::string> overrides =
        args.count("set") ? args["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
    run = config::load_config(path, overrides);
    for (const auto& warning : config::config_warnings(run)) {
      spdlog::warn("{}: {}", path, warning.to_string());
    }
  }

  const model::ModelSize size = model::model_size(run.model, run.moe, run.train.seq_length);
  std::cout << "config: " << path << "\n"
            << config::to_json(run).dump(2) << "\n"
            << "total parameters:  " << with_thousands(size.total_parameters) << "\n"
            << "active parameters: " << with_thousands(size.active_parameters) << "\n"
            << "forward FLOPs per token (seq_length " << run.train.seq_length
            << "): " << with_thousands(size.forward_flops_per_token) << "\n";
  if (!manifest.empty()) {
    std::cout << "checkpoint step: " << manifest["step"].get<int64_t>() << "\n"
              << "tokens seen:     " << with_thousands(manifest["tokens_seen"].get<int64_t>()) << "\n"
              << "layout:          " << manifest["layout"].dump() << "\n"
              << "sampler:         " << manifest["sampler"].dump() << "\n"
              << "tensors:         " << manifest["tensors"].size() << "\n";
    for (const auto& [file, info] : manifest["files"].items()) {
      std::cout << "file: " << file << "  " << with_thousands(info["bytes"].get<int64_t>()) << " bytes  crc32 "
                << info["crc32"].get<uint32_t>() << "\n";
    }
  }
  return 0;
}

}  // namespace yuanmoe::cli
