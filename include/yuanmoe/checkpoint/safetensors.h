// safetensors (github.com/huggingface/safetensors): [u64 LE header size N][N bytes JSON
// header, space-padded to a multiple of 8][tensor bytes, little-endian, row-major]. Used for
// checkpoints, the Hugging Face export and `eval --dump-logits`.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "yuanmoe/core/types.h"

namespace yuanmoe::checkpoint {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors;  // in file order, CPU, contiguous
  std::map<std::string, std::string> metadata;  // "__metadata__" (strings only)
};

/// The safetensors dtype string ("F32", "BF16", ...); throws for types it cannot hold.
std::string safetensors_dtype(c10::ScalarType type);

/// Writes `tensors` (any device; copied to the CPU) ordered by element size, then name, so every
/// tensor is naturally aligned. `"format": "pt"` is always in the metadata (HF requires it). The
/// file is fsync'ed before returning. Throws std::runtime_error naming the path on I/O errors.
void write_safetensors(const std::filesystem::path& path,
                       const NamedTensors& tensors,
                       std::map<std::string, std::string> metadata = {});

/// Reads and validates a whole file (header bounds, dtypes, shapes, contiguous non-overlapping
/// offsets covering the buffer). Every error is one std::runtime_error line naming the path.
SafetensorsFile read_safetensors(const std::filesystem::path& path);

/// CRC-32 (zlib / IEEE polynomial, so Python's zlib.crc32 gives the same value), chainable.
uint32_t crc32(const void* data, size_t bytes, uint32_t crc = 0);

/// CRC-32 of a tensor's bytes as written (contiguous, CPU).
uint32_t tensor_crc32(const Tensor& t);

}  // namespace yuanmoe::checkpoint
