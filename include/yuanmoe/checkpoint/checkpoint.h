// Checkpoints (SPEC §4, docs/checkpoints.md):
//   checkpoints/step_NNNNNNNN/manifest.json       format, step, tokens, sampler, config, layout,
//                                                 every file (bytes, crc32) and tensor (name,
//                                                 shape, dtype, file, crc32), its own checksum
//                            model*.safetensors    parameters and buffers by name, global layer ids
//                            optimizer*.safetensors "{param}/exp_avg", "/exp_avg_sq", "/step"
//                            rng*.safetensors      generator states
//                            tokenizer.model       a copy, so eval/generate need only this dir
//   checkpoints/latest                            "step_NNNNNNNN", replaced last
// One process writes model.safetensors, optimizer.safetensors and rng.safetensors; a pipeline
// writes one model/optimizer shard per stage (model-stage-SS.safetensors, ...) and one rng file
// per rank, in parallel. Loading merges every shard by tensor name, so any layout reads any
// other. A checkpoint is written under .tmp-step_NNNNNNNN, fsync'ed, and renamed: a directory
// named step_* is always complete, whatever moment a run is killed at.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/data/sampler.h"

namespace yuanmoe::checkpoint {

namespace fs = std::filesystem;

constexpr int64_t kFormatVersion = 1;

/// Where training stands: everything besides tensors needed to continue bit-exactly.
struct TrainingProgress {
  int64_t step = 0;         // optimizer steps completed
  int64_t tokens_seen = 0;  // training tokens consumed, all ranks
  data::SamplerState sampler;
};

struct Checkpoint {
  TrainingProgress progress;
  nlohmann::ordered_json config;  // the resolved run config
  nlohmann::ordered_json layout;  // parallel layout it was written at
  NamedTensors model;
  NamedTensors optimizer;
  NamedTensors rng;
  fs::path tokenizer;  // copied in when non-empty
};

/// Writes `checkpoint` as checkpoints_dir/step_NNNNNNNN (see above), points `latest` at it and
/// keeps only the newest `keep_last` step directories. Returns the new directory.
fs::path save_checkpoint(const fs::path& checkpoints_dir, const Checkpoint& checkpoint, int64_t keep_last);

// The same in three phases, for many writers (the caller puts barriers between them):
/// One process: drops leftovers of killed writes, creates and returns the temporary directory.
fs::path begin_checkpoint(const fs::path& checkpoints_dir, int64_t step);
/// Any process: one tensor file into the temporary directory (fsync'ed).
void write_checkpoint_file(const fs::path& tmp_dir, const std::string& file, const NamedTensors& tensors);
/// One process, after every file is written: tokenizer copy, manifest over all files, rename,
/// `latest`, pruning. `checkpoint`'s tensor lists are not used. Returns the step directory.
fs::path finish_checkpoint(const fs::path& checkpoints_dir, const fs::path& tmp_dir, const Checkpoint& checkpoint,
                           int64_t keep_last);

/// The newest complete step directory under checkpoints_dir, if any.
std::optional<fs::path> find_latest_checkpoint(const fs::path& checkpoints_dir);

/// A step directory, a checkpoints directory or a run directory -> the step directory to load
/// (the newest one for the latter two). Throws std::runtime_error naming the path.
fs::path resolve_checkpoint_dir(const fs::path& path);

enum class LoadParts { kAll, kModelOnly };

/// Reads a step directory and verifies it: the manifest's own checksum, every file's presence,
/// size and crc32, every tensor's shape, dtype and crc32. Any mismatch throws one
/// std::runtime_error line naming the file (and tensor).
Checkpoint load_checkpoint(const fs::path& step_dir, LoadParts parts = LoadParts::kAll);

/// The verified manifest alone.
nlohmann::ordered_json read_manifest(const fs::path& step_dir);

/// Parameters and buffers by name (global layer indices), as stored in model.safetensors.
NamedTensors model_state(const torch::nn::Module& model);

/// Copies `state` into the model's parameters and buffers by name. Every name must match both
/// ways, with equal shapes; otherwise std::runtime_error names `source` and the first offender.
void load_model_state(torch::nn::Module& model, const NamedTensors& state, const std::string& source);

/// "step_00000100".
std::string step_dir_name(int64_t step);

}  // namespace yuanmoe::checkpoint
