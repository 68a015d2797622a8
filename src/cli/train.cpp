// `yuanmoe train --config FILE [--set KEY=VALUE]... [--run-dir DIR] [--exit-after-steps N]
//                [--debug-nonfinite-steps N,M,...]`
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>
#include <set>
#include <sstream>

#include "yuanmoe/cli/commands.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"
#include "yuanmoe/parallel/world.h"
#include "yuanmoe/parallel/memory_plan.h"
#include "yuanmoe/train/precision.h"
#include "yuanmoe/train/trainer.h"

namespace yuanmoe::cli {

namespace {

/// "5,6" -> {5, 6}: step numbers >= 1; anything else names `option`.
std::set<int64_t> parse_steps(const std::string& option, const std::string& text) {
  std::set<int64_t> steps;
  std::stringstream list(text);
  std::string item;
  while (std::getline(list, item, ',')) {
    try {
      size_t used = 0;
      const int64_t step = std::stoll(item, &used);
      if (used != item.size() || step < 1) throw std::invalid_argument(item);
      steps.insert(step);
    } catch (const std::exception&) {
      throw std::invalid_argument(option + ": expected step numbers >= 1 separated by commas, got '" + text + "'");
    }
  }
  return steps;
}

/// This rank's failure, told to the others, and the line it exits with: its own message, and
/// the rank that failed first if that was another one (a dead peer shows up here as a closed
/// connection or a timeout).
std::string rank_failure(const parallel::ParallelContext& context, const std::string& message) {
  context.report_failure(message.substr(0, message.find('\n')));
  const parallel::WorldInfo& world = context.world();
  std::string text = "rank " + std::to_string(world.rank) + " of " + std::to_string(world.world_size) + ": " + message;
  if (auto first = context.first_failure(); first && first->rfind("rank " + std::to_string(world.rank) + ":", 0) != 0) {
    text += "\n(first failure: " + *first + ")";
  } else if (!first) {
    text += "\n(no rank reported a failure: one may have died; rank N > 0 logs to train.rankN.log in the run dir)";
  }
  return text;
}

}  // namespace

int run_train(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe train",
                           "Pretrain, or fine-tune with train.init_from. Resumes from the newest complete "
                           "checkpoint in the run dir.");
  options.add_options()
      ("config", "JSON config file", cxxopts::value<std::string>())
      ("set", "override a config key, e.g. --set train.max_steps=50 (repeatable)",
       cxxopts::value<std::vector<std::string>>())
      ("run-dir", "run directory (default: runs/<config name>)", cxxopts::value<std::string>())
      ("exit-after-steps", "stop after N steps in this invocation, with a checkpoint",
       cxxopts::value<int64_t>()->default_value("0"))
      ("debug-nonfinite-steps", "debugging: poison the gradients of these 1-based steps with NaN, e.g. 5,6 "
       "(exercises train.on_nonfinite; docs/reliability.md)", cxxopts::value<std::string>());
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("config")) throw std::invalid_argument("--config FILE is required");
  const std::string path = args["config"].as<std::string>();
  const std::vector<std::string> overrides =
      args.count("set") ? args["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
  // The torchrun / Slurm / Open MPI variables, or a single process (docs/parallelism.md): the
  // world size decides which layouts are possible, so the config and the layout are checked
  // together and every problem is named at once.
  const parallel::WorldInfo world = parallel::detect_world();
  config::ParseResult checked = config::check_config(path, overrides);
  for (auto& issue : parallel::layout_issues(checked.config, world.world_size)) checked.issues.push_back(std::move(issue));
  if (!checked.issues.empty()) throw config::ConfigError(path, checked.issues);
  const config::RunConfig run = checked.config;
  for (const auto& warning : config::config_warnings(run)) spdlog::warn("{}: {}", path, warning.to_string());

  train::TrainerOptions trainer_options;
  trainer_options.run_dir = args.count("run-dir") ? std::filesystem::path(args["run-dir"].as<std::string>())
                                                  : std::filesystem::path("runs") / std::filesystem::path(path).stem();
  trainer_options.exit_after_steps = args["exit-after-steps"].as<int64_t>();
  if (trainer_options.exit_after_steps < 0) {
    throw std::invalid_argument("--exit-after-steps must be >= 0, got " + std::to_string(trainer_options.exit_after_steps));
  }

  if (args.count("debug-nonfinite-steps")) {
    trainer_options.nonfinite_steps = parse_steps("--debug-nonfinite-steps", args["debug-nonfinite-steps"].as<std::string>());
  }

  trainer_options.parallel = parallel::ParallelContext::connect(world, run.parallel.pipeline_parallel_size,
                                                                run.parallel, train::training_device(world.local_rank));
  const parallel::ParallelContext& context = trainer_options.parallel;
  train::TrainSummary summary;
  try {
    train::Trainer trainer(run, trainer_options);
    summary = trainer.run();
    context.world_group.barrier();  // rank 0 serves the store: nobody leaves before everyone is done
  } catch (const config::ConfigError&) {
    throw;  // every rank reads the same config and reports the same problem
  } catch (const std::exception& e) {
    if (!context.distributed()) throw;
    throw std::runtime_error(rank_failure(context, e.what()));
  }
  if (world.rank != 0) return 0;
  const auto& dir = trainer_options.run_dir;
  std::cout << "\nrun dir:     " << dir.string() << "\n"
            << "checkpoint:  " << summary.last_checkpoint.string() << "\n"
            << "metrics:     " << (dir / "metrics.jsonl").string() << "\n"
            << "plots:       " << (dir / "plots").string() << "\n";
  if (summary.first_eval && summary.last_eval) {
    std::printf("valid loss:  %.4f -> %.4f (perplexity %.1f -> %.1f)\n", summary.first_eval->loss,
                summary.last_eval->loss, summary.first_eval->perplexity, summary.last_eval->perplexity);
  }
  return 0;
}

}  // namespace yuanmoe::cli
