// Megatron-LM's indexed dataset (MMIDIDX): a `.bin` of concatenated token ids and an `.idx` that
// locates every sequence. Byte layout of PREFIX.idx (little-endian, packed, no padding):
//   9 bytes   magic "MMIDIDX\x00\x00"
//   uint64    version, always 1
//   uint8     dtype code of the tokens in .bin (DType below)
//   uint64    S, the number of sequences
//   uint64    D, the length of the document index = number of documents + 1
//   int32[S]  sequence lengths, in tokens
//   int64[S]  byte offset of each sequence in .bin
//   int64[D]  document index: sequences [doc[i], doc[i+1]) form document i; doc[0] = 0,
//             doc[D-1] = S
//   int8[S]   optional: per-sequence modes of Megatron's multimodal datasets (ignored here)
// Files written by Megatron's tools/preprocess_data.py load unchanged and vice versa.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace yuanmoe::data {

/// Token storage types, with Megatron's codes (megatron/core/datasets/indexed_dataset.py, DType).
enum class DType : uint8_t {
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUInt16 = 8,
};

/// Bytes per element.
size_t dtype_size(DType dtype);
/// numpy's name: "uint16", "int32", ...
const char* dtype_name(DType dtype);
/// Megatron's best-fitting token type: uint16 when vocab_size < 65500, else int32.
DType best_fitting_dtype(int64_t vocab_size);

inline std::string index_file_path(const std::string& prefix) { return prefix + ".idx"; }
inline std::string data_file_path(const std::string& prefix) { return prefix + ".bin"; }

/// The 9 magic bytes that open every .idx file.
inline constexpr char kIndexMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};

/// Streams sequences into PREFIX.bin and writes PREFIX.idx on finish(). Both are written under
/// temporary names and renamed by finish(), so an interrupted run never leaves a half dataset that
/// looks complete. Memory: 12 bytes per sequence (the index), tokens go straight to disk.
class IndexedDatasetWriter {
 public:
  IndexedDatasetWriter(const std::string& prefix, DType dtype);
  ~IndexedDatasetWriter();  ///< without finish(): removes the temporary files
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  /// Appends one sequence of `count` tokens; throws when a token does not fit the dtype.
  void add_sequence(const int32_t* tokens, size_t count);
  /// Closes the current document (Megatron's end_document): every sequence added since the
  /// previous call belongs to it.
  void end_document();
  /// One sequence that is a whole document (what prepare-data writes).
  void add_document(const int32_t* tokens, size_t count) {
    add_sequence(tokens, count);
    end_document();
  }
  /// Writes the index and moves both files into place. Sequences added after the last
  /// end_document() form a final document.
  void finish();

  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(document_index_.size()) - 1; }
  int64_t num_tokens() const { return num_tokens_; }
  DType dtype() const { return dtype_; }

 private:
  std::string prefix_;
  DType dtype_;
  std::FILE* bin_ = nullptr;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> document_index_{0};
  std::vector<char> buffer_;
  int64_t num_tokens_ = 0;
  bool finished_ = false;
};

/// A read-only memory-mapped dataset. Construction validates the whole index (magic, version,
/// dtype, counts against the file size, every sequence inside .bin), so later reads cannot go out
/// of bounds; any problem throws std::runtime_error naming the offending file.
class IndexedDataset {
 public:
  explicit IndexedDataset(const std::string& prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  const std::string& prefix() const { return prefix_; }
  DType dtype() const { return dtype_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return document_count_ - 1; }
  int64_t num_tokens() const { return num_tokens_; }

  /// Length in tokens of sequence `i`, 0 <= i < num_sequences().
  int64_t sequence_length(int64_t i) const;
  /// Byte offset of sequence `i` in .bin.
  int64_t sequence_pointer(int64_t i) const;
  /// Entry `i` of the document index, 0 <= i <= num_documents().
  int64_t document_index(int64_t i) const;

  /// Zero-copy view of sequence `i` in the mapping (sequence_length(i) elements of dtype()).
  const void* sequence_data(int64_t i) const;
  /// Tokens [offset, offset + count) of sequence `i`, widened to int64, written to `out`.
  void read(int64_t i, int64_t offset, int64_t count, int64_t* out) const;
  /// The whole of sequence `i`, widened to int64.
  std::vector<int64_t> sequence(int64_t i) const;

 private:
  struct Mapping;
  void check_index(int64_t i, int64_t bound, const char* what) const;

  std::string prefix_;
  std::unique_ptr<Mapping> idx_;
  std::unique_ptr<Mapping> bin_;
  DType dtype_ = DType::kUInt16;
  int64_t num_sequences_ = 0;
  int64_t document_count_ = 0;  ///< D, as stored: documents + 1
  int64_t num_tokens_ = 0;
  const unsigned char* lengths_ = nullptr;   ///< int32[S], unaligned: read with memcpy
  const unsigned char* pointers_ = nullptr;  ///< int64[S], unaligned
  const unsigned char* documents_ = nullptr; ///< int64[D], unaligned
};

}  // namespace yuanmoe::data
