// `yuanmoe bench --config FILE [--set KEY=VALUE]... [--steps N] [--warmup N] [--repeats N]
//                [--step-only] [--data] [--attention-kernel K] [--json FILE]`: train/benchmark.h measures, this prints and saves.
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>

#include "yuanmoe/cli/commands.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/train/benchmark.h"

namespace yuanmoe::cli {

int run_bench(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe bench",
                           "Training-step tokens/s and MFU of a config on random tokens, a per-component "
                           "breakdown, MoE vs dense and SDPA vs materialised attention side by side, "
                           "and peak resident memory (docs/benchmarks.md).");
  options.add_options()
      ("config", "JSON config file", cxxopts::value<std::string>())
      ("set", "override a config key, e.g. --set train.seq_length=4096 (repeatable)",
       cxxopts::value<std::vector<std::string>>())
      ("steps", "timed optimizer steps", cxxopts::value<int64_t>()->default_value("5"))
      ("warmup", "untimed steps first", cxxopts::value<int64_t>()->default_value("1"))
      ("repeats", "runs per component timing (median)", cxxopts::value<int64_t>()->default_value("7"))
      ("step-only", "only the training step and peak memory (no breakdown)")
      ("data", "the step's micro-batches from the config's data (data.train_prefix or data.blend, with its masks) "
       "instead of random tokens")
      ("attention-kernel", "only this causal attention kernel, fwd+bwd on one micro-batch, and its memory: "
       "sdpa or materialised", cxxopts::value<std::string>())
      ("profile", "after the timed steps, one more under LibTorch's profiler, its Chrome trace written to FILE "
       "(bench/profile_step.py sums it per operator)", cxxopts::value<std::string>())
      ("json", "also write the figures as JSON to FILE", cxxopts::value<std::string>());
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("config")) throw std::invalid_argument("--config FILE is required");
  const std::vector<std::string> overrides =
      args.count("set") ? args["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  const config::RunConfig run = config::load_config(args["config"].as<std::string>(), overrides);

  train::BenchOptions bench;
  bench.steps = args["steps"].as<int64_t>();
  bench.warmup = args["warmup"].as<int64_t>();
  bench.repeats = args["repeats"].as<int64_t>();
  bench.step_only = args.count("step-only") > 0;
  bench.real_data = args.count("data") > 0;
  if (args.count("attention-kernel")) bench.attention_kernel = args["attention-kernel"].as<std::string>();
  if (args.count("profile")) {
    bench.profile_path = args["profile"].as<std::string>();
    if (!std::ofstream(bench.profile_path)) throw std::runtime_error(bench.profile_path + ": cannot open for writing");
  }
  std::ofstream json_file;
  if (args.count("json")) {  // opened first: a bad path fails before minutes of measuring
    const std::string path = args["json"].as<std::string>();
    json_file.open(path);
    if (!json_file) throw std::runtime_error(path + ": cannot open for writing");
  }
  const train::BenchReport report = train::run_benchmark(run, bench);
  std::cout << train::format_report(report);
  if (json_file.is_open()) json_file << train::to_json(report, run).dump(2) << "\n";
  return 0;
}

}  // namespace yuanmoe::cli
