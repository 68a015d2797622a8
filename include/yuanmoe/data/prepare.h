// `prepare-data`: raw text or JSONL in, Megatron indexed datasets (train and valid) out.
//
// Input formats (chosen by extension unless forced):
//   *.jsonl, *.ndjson, *.json  one JSON object per line, the document is its "text" string
//   anything else              plain text: a block of lines separated by one or more blank lines
//                              is one document (its lines joined by "\n")
// Instruction (SFT) data, with --format sft-text or sft-jsonl only: one sample per line,
// `instruction<sep>response` with `<n>` for a newline (sft-text, Yuan 2.0's layout) or a JSON
// object with "prompt" and "response" strings (sft-jsonl). A sample is one document: prompt,
// <sep>, response, EOD. A line that is no sample is warned about and left out; the others are kept.
// Every document gets the EOD token appended; documents that encode to nothing are skipped.
// Document i (counted over all inputs, in order) goes to the validation split when
// floor((i + 1) * f + 1/2) > floor(i * f + 1/2), f = valid_fraction: an exact, evenly spread and
// deterministic share that needs no look-ahead, so input of any size is streamed in one pass.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "yuanmoe/data/indexed_dataset.h"

namespace yuanmoe::data {

class Tokenizer;

enum class InputFormat { kAuto, kText, kJsonl, kSftText, kSftJsonl };

/// "auto" | "text" | "jsonl" | "sft-text" | "sft-jsonl"; throws std::invalid_argument listing the
/// choices.
InputFormat parse_input_format(const std::string& name);

/// sft-text or sft-jsonl: every line is an instruction sample.
inline bool is_sft(InputFormat format) {
  return format == InputFormat::kSftText || format == InputFormat::kSftJsonl;
}

/// One document of the input and where it starts (for error messages).
struct Document {
  std::string text;  ///< for JSONL: the raw line, until parse_document() extracts "text"; SFT: the raw line
  std::string file;
  int64_t line = 0;  ///< 1-based line of the document's first line
  InputFormat format = InputFormat::kText;  ///< how `text` is to be read (never kAuto)
};

/// Streams documents out of a list of files with constant memory (one document at a time).
class DocumentReader {
 public:
  DocumentReader(std::vector<std::string> files, InputFormat format);
  ~DocumentReader();
  /// The next document; false at the end of the last file. Throws std::runtime_error naming the
  /// file when one cannot be opened or read. JSONL lines are returned raw (see parse_document).
  bool next(Document& document);
  /// Bytes consumed so far, over all files.
  int64_t bytes_read() const { return bytes_read_; }

 private:
  bool open_next_file();

  std::vector<std::string> files_;
  InputFormat format_;
  size_t file_index_ = 0;
  struct Stream;
  std::unique_ptr<Stream> stream_;
  int64_t bytes_read_ = 0;
};

/// Turns a raw JSONL line into its "text" (in place); throws std::runtime_error "FILE:LINE: ..."
/// for invalid JSON, a missing "text" key or a non-string value. No-op for other formats.
void parse_document(Document& document);

/// One instruction sample: what the model is asked and the response it learns to give.
struct SftSample {
  std::string prompt;
  std::string response;
  std::string problem;  ///< why the line is no usable sample ("no <sep> ..."); empty when it is one
};

/// The sample of an sft-text or sft-jsonl line, its `<n>` (sft-text) turned into "\n". A line
/// without exactly one <sep>, with an empty response, invalid JSON or without the two string
/// fields gives a sample whose `problem` says so.
SftSample parse_sft_sample(const Document& line);

/// The document of a sample: encode_lines(prompt), <sep>, encode_lines(response), EOD. Throws
/// std::runtime_error naming the tokenizer file when it has no <sep> piece.
std::vector<int32_t> encode_sft_sample(const Tokenizer& tokenizer, const SftSample& sample);

/// A prompt to continue (generate), encoded as the samples it continues were: text with a <sep>
/// (Yuan's layout, `<n>` for a newline) as encode_sft_sample encodes the instruction, then the
/// <sep> id, then the start of the response if any; text without one as plain text (encode).
/// SentencePiece gives each encoded part a dummy-prefix space, so encoding the whole text at once
/// would not give the ids a model fine-tuned on prepare-data's samples has seen.
std::vector<int32_t> encode_prompt(const Tokenizer& tokenizer, const std::string& text);

struct PrepareOptions {
  std::vector<std::string> inputs;
  InputFormat format = InputFormat::kAuto;
  std::string output_prefix;      ///< writes PREFIX_train.{bin,idx} and PREFIX_valid.{bin,idx}
  std::string tokenizer;          ///< an existing .model, or empty when training one
  int64_t train_vocab_size = 0;   ///< > 0: train PREFIX.model with this many pieces first
  std::string tokenizer_type = "bpe";
  int64_t tokenizer_max_sentences = 2'000'000;
  double valid_fraction = 0.02;
  int workers = 1;
  double log_interval_s = 10.0;   ///< seconds between progress lines
};

/// One written split.
struct SplitSummary {
  std::string prefix;
  int64_t documents = 0;
  int64_t tokens = 0;  ///< EOD tokens included
};

struct PrepareSummary {
  std::string tokenizer;
  int64_t vocab_size = 0;
  int32_t eod_id = -1;
  int32_t sep_id = -1;      ///< -1: the tokenizer has no <sep>
  int32_t newline_id = -1;  ///< -1: the tokenizer has no <n>
  DType dtype = DType::kUInt16;
  SplitSummary train;
  SplitSummary valid;
  int64_t skipped_documents = 0;
  int64_t bad_samples = 0;  ///< SFT lines that are no sample, each warned about and left out
  int64_t input_bytes = 0;
  double tokenizer_train_seconds = 0;
  double tokenize_seconds = 0;  ///< the encode-and-write pass alone
};

/// The whole command: optionally trains a tokenizer, then tokenizes every input into the two
/// splits and writes a PREFIX_{train,valid}.meta.json sidecar next to each (Megatron ignores it).
PrepareSummary prepare_data(const PrepareOptions& options);

/// Dataset metadata written by prepare-data (PREFIX.meta.json); absent for Megatron-made data.
struct DatasetMeta {
  std::string tokenizer;
  int64_t vocab_size = 0;
  int64_t eod_id = -1;
  int64_t pad_id = -1;
  int64_t unk_id = -1;
  int64_t sep_id = -1;      ///< -1: none, or a .meta.json without the key
  int64_t newline_id = -1;
  bool sft = false;         ///< documents are instruction samples: prompt, <sep>, response, EOD
  int64_t documents = 0;
  int64_t tokens = 0;
  std::string dtype;
};

inline std::string meta_file_path(const std::string& prefix) { return prefix + ".meta.json"; }

/// Reads PREFIX.meta.json when it exists; throws std::runtime_error naming the file when it exists
/// but is not valid.
std::optional<DatasetMeta> load_dataset_meta(const std::string& prefix);

}  // namespace yuanmoe::data
