// Subcommands of the `yuanmoe` executable. Each parses its own options (cxxopts) and returns the
// process exit code; errors are thrown and turned into one-line messages by main().
#pragma once

#include <cxxopts.hpp>
#include <optional>
#include <string>

namespace yuanmoe::cli {

/// `yuanmoe inspect (--config FILE [--set KEY=VALUE]... | --checkpoint DIR)`
int run_inspect(int argc, const char* const* argv);

/// `yuanmoe prepare-data --input FILE... --output PREFIX (--tokenizer MODEL | --train-tokenizer VOCAB)`
int run_prepare_data(int argc, const char* const* argv);

/// `yuanmoe train --config FILE [--set KEY=VALUE]... [--run-dir DIR] [--exit-after-steps N]`
int run_train(int argc, const char* const* argv);

/// `yuanmoe eval --checkpoint DIR [--data PREFIX] [--steps N] [--dump-logits FILE]`
int run_eval(int argc, const char* const* argv);

/// `yuanmoe generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]`
int run_generate(int argc, const char* const* argv);

/// `yuanmoe launch --nproc N [--master-port P] -- COMMAND [ARGS...]`
int run_launch(int argc, const char* const* argv);

/// `yuanmoe export-hf --checkpoint DIR --output DIR [--dtype fp32|bf16] [--max-shard-size SIZE]`
int run_export_hf(int argc, const char* const* argv);

/// `yuanmoe import-hf --input DIR --output DIR [--rope-base B] [--rope-tables MODE]`
int run_import_hf(int argc, const char* const* argv);

/// `yuanmoe bench`: training-step throughput, MFU, breakdown and memory of a config.
int run_bench(int argc, const char* const* argv);

/// Adds -h/--help and parses argv; prints the help and returns nullopt when it was asked for.
std::optional<cxxopts::ParseResult> parse_or_help(cxxopts::Options& options, int argc, const char* const* argv);

/// What --checkpoint accepts, for every command that reads one.
inline constexpr const char* kCheckpointOptionHelp =
    "checkpoint step dir, or a run / checkpoints dir (newest checkpoint)";

/// 1234567 -> "1,234,567".
std::string with_thousands(int64_t value);

}  // namespace yuanmoe::cli
