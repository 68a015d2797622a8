// The weight files of a Hugging Face model directory (docs/interop.md;
// the safetensors format: github.com/huggingface/safetensors): one `model.safetensors`, safetensors shards listed by
// `model.safetensors.index.json`, or the PyTorch pickles the published Yuan2-M32-hf ships
// (`pytorch_model.bin`, or shards listed by `pytorch_model.bin.index.json`).
// An index is {"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "yuanmoe/checkpoint/safetensors.h"

namespace yuanmoe::checkpoint {

/// Every tensor of the model in `dir` (CPU, contiguous, as stored), in shard order. Each index
/// entry must name an existing shard that holds exactly the tensors the index assigns to it;
/// each problem throws one std::runtime_error line naming the file.
NamedTensors read_hf_weights(const std::filesystem::path& dir);

/// A `torch.save` file (zip format) holding a dict of tensors, read by LibTorch's unpickler.
NamedTensors read_torch_state_dict(const std::filesystem::path& file);

/// Writes `tensors` into `dir` as `model.safetensors`, or, when they exceed `max_shard_bytes`,
/// as `model-0000i-of-0000N.safetensors` in the given order (a tensor larger than the limit
/// gets a shard of its own) plus `model.safetensors.index.json`. Returns the files written.
std::vector<std::string> write_hf_weights(const std::filesystem::path& dir,
                                          const NamedTensors& tensors,
                                          uint64_t max_shard_bytes);

/// "5GB", "200KB", "1GiB", "123" -> bytes (HF's max_shard_size spelling: KB/MB/GB are powers
/// of 1000, KiB/MiB/GiB of 1024). Throws std::invalid_argument naming the text.
uint64_t parse_byte_size(const std::string& text);

}  // namespace yuanmoe::checkpoint
