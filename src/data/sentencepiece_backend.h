// Private interface between the Tokenizer and the SentencePiece module (libyuanmoe_sentencepiece.so).
//
// Why a separate module: Debian's libsentencepiece bundles protobuf-lite 3.14 and exports its
// symbols, and libtorch exports a protobuf of its own (PyTorch 2.11's libtorch_cpu.so: 232 protobuf
// symbols; Debian's 1.13 linked libprotobuf 3.21). Linked into one process the
// two bind to each other's functions and the process dies in static initialisation. The module
// is therefore loaded with dlopen(RTLD_LOCAL | RTLD_DEEPBIND): SentencePiece resolves protobuf to
// its own copy and nothing of it leaks into the global symbol scope. Only this header's types
// cross the boundary; errors come back as strings (never exceptions through SentencePiece frames).
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace yuanmoe::data::detail {

class SentencePieceBackend {
 public:
  virtual ~SentencePieceBackend() = default;
  /// Each returns "" on success, else SentencePiece's message.
  virtual std::string load(const std::string& path) = 0;
  virtual std::string encode(std::string_view text, std::vector<int>* ids) const = 0;
  virtual std::string decode(const std::vector<int>& ids, std::string* text) const = 0;
  virtual int piece_size() const = 0;
  virtual int piece_to_id(const std::string& piece) const = 0;
  virtual std::string id_to_piece(int id) const = 0;
  virtual int unk_id() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  virtual int pad_id() const = 0;
};

/// Yields the next training sentence; false at the end.
using SentenceCallback = std::function<bool(std::string&)>;

/// The module's entry points (extern "C" so dlsym finds them by plain name).
using CreateBackendFn = SentencePieceBackend* (*)();
/// Trains and writes args["model_prefix"].model/.vocab; sets *error ("" on success).
using TrainFn = void (*)(const std::unordered_map<std::string, std::string>& args,
                         const SentenceCallback& sentences, unsigned seed, std::string* error);
inline constexpr const char* kCreateBackendSymbol = "yuanmoe_spm_create";
inline constexpr const char* kTrainSymbol = "yuanmoe_spm_train";
inline constexpr const char* kModuleFile = "libyuanmoe_sentencepiece.so";

}  // namespace yuanmoe::data::detail
