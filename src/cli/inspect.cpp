// `yuanmoe inspect`: the resolved config, parameter counts, FLOPs per token and the memory per
// rank of a parallel layout, computed from the config alone (no weights are allocated, so the
// 40B config is instant).
#include <cxxopts.hpp>
#include <iostream>

#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/cli/commands.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/model/param_count.h"
#include "yuanmoe/parallel/memory_plan.h"

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

namespace {

double gigabytes(int64_t bytes) { return static_cast<double>(bytes) / 1e9; }
double gibibytes(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

/// The layout and one row per pipeline stage (docs/parallelism.md, "Memory per rank").
void print_memory_plan(const parallel::MemoryPlan& plan) {
  const parallel::GroupSizes& g = plan.groups;
  std::cout << "\nmemory per rank: fp32 parameters and gradients, AdamW state (8 bytes per parameter); "
               "activations not counted; GB = 1e9 bytes\n"
            << fmt::format("layout: world {} = pp {} x dp {}; ep {}, edp {} (= dp / ep); optimizer state {}\n",
                           g.world, g.pipeline, g.data, g.expert, g.expert_data,
                           g.shard_optimizer ? "sharded (non-expert over dp, expert over edp)" : "not sharded");
  std::cout << fmt::format("{:>5}  {:>7}  {:>9}  {:>17}  {:>17}  {:>9}  {:>8}  {:>12}  {:>8}\n", "stage", "layers",
                           "ranks", "non-expert params", "expert params", "params GB", "grads GB", "optimizer GB",
                           "total GB");
  for (size_t s = 0; s < plan.stages.size(); ++s) {
    const parallel::StageMemory& m = plan.stages[s];
    const int64_t first_rank = static_cast<int64_t>(s) * g.data;
    std::cout << fmt::format("{:>5}  {:>7}  {:>9}  {:>17}  {:>17}  {:>9.2f}  {:>8.2f}  {:>12.2f}  {:>8.2f}\n", s,
                             fmt::format("{}-{}", m.first_layer, m.end_layer - 1),
                             fmt::format("{}-{}", first_rank, first_rank + g.data - 1),
                             with_thousands(m.non_expert_parameters), with_thousands(m.expert_parameters),
                             gigabytes(m.parameter_bytes), gigabytes(m.gradient_bytes),
                             gigabytes(m.optimizer_bytes), gigabytes(m.total_bytes()));
  }
  const parallel::StageMemory& worst = plan.stages[static_cast<size_t>(plan.worst_stage)];
  std::cout << fmt::format("worst stage: {}, {:.2f} GB = {:.2f} GiB per rank\n", plan.worst_stage,
                           gigabytes(worst.total_bytes()), gibibytes(worst.total_bytes()));
}

}  // namespace

int run_inspect(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe inspect",
                           "Print the resolved config, parameter counts and FLOPs per token.");
  options.add_options()
      ("config", "JSON config file", cxxopts::value<std::string>())
      ("checkpoint", kCheckpointOptionHelp, cxxopts::value<std::string>())
      ("set", "override a config key, e.g. --set moe.router=linear (repeatable)",
       cxxopts::value<std::vector<std::string>>())
      ("world-size", "ranks of the layout whose memory per rank to print (default: "
       "parallel.pipeline_parallel_size x parallel.expert, the smallest it allows)",
       cxxopts::value<int64_t>());
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (args.count("config") == args.count("checkpoint")) {
    throw std::invalid_argument("exactly one of --config FILE and --checkpoint DIR is required");
  }
  std::string path, issue_source;  // issue_source: what names the config in error lines
  config::RunConfig run;
  std::vector<config::ConfigIssue> issues;
  nlohmann::ordered_json manifest;
  if (args.count("checkpoint")) {
    // Metadata only: the manifest is verified, the weights are not read.
    const auto dir = checkpoint::resolve_checkpoint_dir(args["checkpoint"].as<std::string>());
    path = (dir / "manifest.json").string();
    issue_source = path + " (config)";
    manifest = checkpoint::read_manifest(dir);
    config::ParseResult parsed = config::parse_config(nlohmann::json::parse(manifest["config"].dump()));
    if (!parsed.issues.empty()) throw config::ConfigError(issue_source, parsed.issues);
    run = parsed.config;
  } else {
    path = issue_source = args["config"].as<std::string>();
    const std::vector<std::string> overrides =
        args.count("set") ? args["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
    config::ParseResult checked = config::check_config(path, overrides);
    issues = std::move(checked.issues);
    run = checked.config;
  }
  // The layout's rules with the config's, so one run names every problem, one line each.
  const int64_t world_size =
      args.count("world-size") ? args["world-size"].as<int64_t>() : parallel::smallest_world_size(run.parallel);
  for (auto& issue : parallel::layout_issues(run, world_size)) issues.push_back(std::move(issue));
  if (!issues.empty()) throw config::ConfigError(issue_source, issues);
  if (!args.count("checkpoint")) {
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
              << "sampler:         "
              << (manifest.contains("blend_sampler") ? manifest["blend_sampler"] : manifest["sampler"]).dump() << "\n"
              << "tensors:         " << manifest["tensors"].size() << "\n";
    for (const auto& [file, info] : manifest["files"].items()) {
      std::cout << "file: " << file << "  " << with_thousands(info["bytes"].get<int64_t>()) << " bytes  crc32 "
                << info["crc32"].get<uint32_t>() << "\n";
    }
  }
  print_memory_plan(parallel::memory_plan(run, world_size));
  return 0;
}

}  // namespace yuanmoe::cli
