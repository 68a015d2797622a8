// A model rebuilt from a checkpoint alone: its resolved config, the weights by name, and the
// tokenizer copy stored beside them (eval, generate, inspect, export-hf).
#pragma once

#include <filesystem>

#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/config/config.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::checkpoint {

struct LoadedModel {
  std::filesystem::path dir;  // the step directory
  config::RunConfig config;
  TrainingProgress progress;
  model::Transformer model{nullptr};  // eval mode, CPU
  std::filesystem::path tokenizer;    // empty when the checkpoint has none
};

/// `path`: a step, checkpoints or run directory (resolve_checkpoint_dir). Throws naming the
/// file on any problem (see load_checkpoint).
LoadedModel load_model(const std::filesystem::path& path);

}  // namespace yuanmoe::checkpoint
