// Checkpoints (docs/training.md, "Checkpoints"):
//   checkpoints/step_NNNNNNNN/manifest.json       format, step, tokens, sampler, config, layout,
//                                                 every file (bytes, crc32) and tensor (name,
//                                                 shape, dtype, file, crc32), its own checksum
//                            model-stage-SS.safetensors     parameters and buffers of pipeline
//                                                 stage SS by name, global layer ids
//                            optimizer-stage-SS.safetensors "{param}/exp_avg", "/exp_avg_sq", "/step"
//                            rng-rank-R.safetensors generator states of rank R ("rankR/cpu",
//                                                 "rankR/cuda")
//                            tokenizer.model       a copy, so eval/generate need only this dir
//   checkpoints/latest                            "step_NNNNNNNN", replaced last
// One process is stage 0 and rank 0 of the same layout. Loading merges every shard by tensor
// name, so any layout reads any other, and the single files of earlier versions
// (model.safetensors, ...) too. A checkpoint is written under a temporary name, fsync'ed, and
// renamed: a directory named step_* is always complete, whatever moment a run is killed at.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/config/config.h"
#include "yuanmoe/data/blend.h"
#include "yuanmoe/data/sampler.h"

namespace yuanmoe::checkpoint {

namespace fs = std::filesystem;

constexpr int64_t kFormatVersion = 1;

/// Where training stands: everything besides tensors needed to continue bit-exactly.
struct TrainingProgress {
  int64_t step = 0;         // optimizer steps completed
  int64_t tokens_seen = 0;  // training tokens consumed, all ranks
  data::SamplerState sampler;
  /// The blend's state when data.blend is set (manifest key "blend_sampler", in place of "sampler").
  std::optional<data::BlendState> blend;
};

/// The parallel layout a checkpoint was written at.
/// The parallel layout a checkpoint was written at (for the record: the tensors are stored in
/// the global layout, so any layout reads them).
struct CheckpointLayout {
  int64_t pipeline_parallel_size = 1;
  int64_t data_parallel_size = 1;
  int64_t expert_parallel_size = 1;
  bool sharded_optimizer = false;
  bool operator==(const CheckpointLayout& other) const {
    return pipeline_parallel_size == other.pipeline_parallel_size && data_parallel_size == other.data_parallel_size &&
           expert_parallel_size == other.expert_parallel_size && sharded_optimizer == other.sharded_optimizer;
  }
};

struct Checkpoint {
  TrainingProgress progress;
  config::RunConfig config;  // the resolved run config (keys added since read as their defaults)
  CheckpointLayout layout;
  NamedTensors model;
  NamedTensors optimizer;
  NamedTensors rng;
  fs::path tokenizer;  // copied in when non-empty
};

/// The tensor files of the layout above.
std::string model_file(int64_t stage);
std::string optimizer_file(int64_t stage);
std::string rng_file(int64_t rank);

/// Writes `checkpoint` from one process (stage 0, rank 0) as checkpoints_dir/step_NNNNNNNN (see
/// above), points `latest` at it and keeps only the newest `keep_last` step directories.
/// Returns the new directory.
fs::path save_checkpoint(const fs::path& checkpoints_dir, const Checkpoint& checkpoint, int64_t keep_last);

// The same in three phases, for many writers (the caller puts barriers between them):
/// Where the files of step `step` are written before the rename.
fs::path temporary_checkpoint_dir(const fs::path& checkpoints_dir, int64_t step);
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
/// size and crc32, every tensor's shape, dtype and crc32, and its config. Any mismatch throws one
/// std::runtime_error line naming the file (and tensor or key).
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
