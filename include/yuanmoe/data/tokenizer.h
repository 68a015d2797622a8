// SentencePiece tokenizer: load any `.model` (our own, LLaMA's, Yuan's), encode/decode, and train a
// new model from a stream of sentences. The end-of-document id is resolved once, here, so every
// other part of the data pipeline agrees on it. SentencePiece itself lives in a separately loaded
// module (libyuanmoe_sentencepiece.so, next to the executable; YUANMOE_SENTENCEPIECE_MODULE
// overrides the path) because its bundled protobuf clashes with libtorch's.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace yuanmoe::data {

namespace detail {
class SentencePieceBackend;
}

/// The end-of-document piece that prepare-data appends after every document (Yuan's spelling).
inline constexpr const char* kEodPiece = "<eod>";
/// Between an instruction and its response in an SFT sample (Yuan 2.0's `instruction<sep>response`).
inline constexpr const char* kSepPiece = "<sep>";
/// A line break where the model has this piece (Yuan 2.0 writes every newline as `<n>`).
inline constexpr const char* kNewlinePiece = "<n>";

class Tokenizer {
 public:
  /// Loads a SentencePiece model file. Throws std::runtime_error naming `path` when the file is
  /// missing or not a model, or when it has neither an `<eod>` piece nor an EOS id.
  explicit Tokenizer(const std::string& path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  /// Text -> token ids (no EOD appended), as SentencePiece encodes it ("\n" included).
  /// Thread-safe: several threads may encode at once.
  std::vector<int32_t> encode(std::string_view text) const;
  /// Text -> token ids with every "\n" as the `<n>` piece: each line is encoded on its own and the
  /// lines are joined by newline_id(). Without an `<n>` piece, the same as encode().
  std::vector<int32_t> encode_lines(std::string_view text) const;
  /// Token ids -> text. Control pieces (BOS, EOS, pad) decode to nothing; `<n>` decodes to "\n"
  /// (the ids between two of them decode on their own, the inverse of encode_lines); other
  /// user-defined pieces (`<eod>`, `<sep>`) decode to their own text.
  std::string decode(const std::vector<int32_t>& ids) const;
  /// The surface string of one id (e.g. "▁the", "<eod>"); throws on an id outside the vocabulary.
  std::string piece(int32_t id) const;

  int64_t vocab_size() const;
  /// `<eod>` when the model has it, else the model's EOS (`</s>`, LLaMA-style models).
  int32_t eod_id() const { return eod_id_; }
  int32_t sep_id() const { return sep_id_; }          ///< `<sep>`; -1 when the model has no such piece
  int32_t newline_id() const { return newline_id_; }  ///< `<n>`; -1 when the model has no such piece
  int32_t pad_id() const;  ///< -1 when the model has no pad piece
  int32_t unk_id() const;
  int32_t bos_id() const;  ///< -1 when disabled
  int32_t eos_id() const;  ///< -1 when disabled
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<detail::SentencePieceBackend> sp_;
  int32_t eod_id_ = -1;
  int32_t sep_id_ = -1;
  int32_t newline_id_ = -1;
};

/// How a new tokenizer is trained (prepare-data --train-tokenizer).
struct TokenizerTrainOptions {
  int64_t vocab_size = 8192;
  /// Pieces that are always one token, also where their text appears literally in the input;
  /// ids 4, 5, ... in this order, after <unk>, <s>, </s>, <pad>.
  std::vector<std::string> user_defined_pieces{kEodPiece, kSepPiece, kNewlinePiece};
  /// "bpe" (default, as LLaMA and Yuan 2.0) or "unigram".
  std::string model_type = "bpe";
  /// SentencePiece keeps at most this many sentences in memory, sampled uniformly (reservoir)
  /// from the whole stream, so the input may be of any size.
  int64_t max_sentences = 2'000'000;
  /// Longer training sentences are skipped by SentencePiece (callers should drop them first).
  int64_t max_sentence_bytes = 16384;
  int num_threads = 1;
  uint64_t seed = 1234;
};

/// Produces training sentences one at a time; returns false when the stream is exhausted.
using SentenceSource = std::function<bool(std::string& sentence)>;

/// Trains a SentencePiece model on the sentences of `source` and writes `model_prefix.model` and
/// `model_prefix.vocab`. Pieces: <unk>=0, <s>=1, </s>=2, <pad>=3, then the user-defined pieces
/// (<eod>=4, <sep>=5, <n>=6 by default; a literal "<eod>" in text also maps to its piece), 256
/// byte-fallback pieces, then learned pieces.
/// Lossless: identity normalisation and byte fallback make decode(encode(text)) == text.
void train_tokenizer(const SentenceSource& source, const std::string& model_prefix,
                     const TokenizerTrainOptions& options);

}  // namespace yuanmoe::data
