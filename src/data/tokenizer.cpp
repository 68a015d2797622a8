// Tokenizer on top of the SentencePiece module: loads the module once (dlopen, isolated symbols),
// turns its status strings into exceptions naming the model file, and streams training sentences
// through a callback so the input is never loaded whole.
#include "yuanmoe/data/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <mutex>
#include <stdexcept>

#include "sentencepiece_backend.h"

#ifndef YUANMOE_SENTENCEPIECE_MODULE_PATH
#define YUANMOE_SENTENCEPIECE_MODULE_PATH ""
#endif

namespace yuanmoe::data {

namespace {

struct Module {
  detail::CreateBackendFn create = nullptr;
  detail::TrainFn train = nullptr;
};

/// Candidate locations, first hit wins: $YUANMOE_SENTENCEPIECE_MODULE, the directory of the
/// running executable, the build tree that compiled this file.
std::vector<std::string> module_candidates() {
  std::vector<std::string> paths;
  if (const char* env = std::getenv("YUANMOE_SENTENCEPIECE_MODULE"); env && *env) paths.emplace_back(env);
  std::string self(4096, '\0');
  const auto n = ::readlink("/proc/self/exe", self.data(), self.size());
  if (n > 0) {
    self.resize(static_cast<size_t>(n));
    paths.push_back(self.substr(0, self.rfind('/') + 1) + detail::kModuleFile);
  }
  if (*YUANMOE_SENTENCEPIECE_MODULE_PATH) paths.emplace_back(YUANMOE_SENTENCEPIECE_MODULE_PATH);
  return paths;
}

/// dlopen, except under AddressSanitizer: its interceptor refuses RTLD_DEEPBIND outright
/// (google/sanitizers#611: a deep-bound library would find libc's malloc before ASan's). Our module
/// is linked against libasan ahead of everything else, so its deep-bound scope still reaches ASan's
/// malloc first; the refusal does not apply to it, and libc's own dlopen loads it unchanged.
void* open_module(const char* path, int flags) {
#if defined(__SANITIZE_ADDRESS__)
  using DlopenFn = void* (*)(const char*, int);
  static const auto libc_dlopen = [] {
    void* libc = ::dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    return libc ? reinterpret_cast<DlopenFn>(::dlsym(libc, "dlopen")) : nullptr;
  }();
  if (libc_dlopen) return libc_dlopen(path, flags);
#endif
  return ::dlopen(path, flags);
}

const Module& module() {
  static Module loaded;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    for (const auto& path : module_candidates()) {
      if (!std::ifstream(path).good()) continue;
      // RTLD_DEEPBIND: SentencePiece binds to its own protobuf, not libtorch's (see
      // sentencepiece_backend.h); RTLD_LOCAL keeps its symbols away from everyone else.
      void* handle = open_module(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (!handle) {
        error = path + ": cannot load the SentencePiece module (" + ::dlerror() + ")";
        return;
      }
      loaded.create = reinterpret_cast<detail::CreateBackendFn>(::dlsym(handle, detail::kCreateBackendSymbol));
      loaded.train = reinterpret_cast<detail::TrainFn>(::dlsym(handle, detail::kTrainSymbol));
      if (!loaded.create || !loaded.train) error = path + ": not a yuanmoe SentencePiece module";
      return;  // the handle stays open for the life of the process
    }
    error = std::string(detail::kModuleFile) +
            ": SentencePiece module not found next to the executable; set YUANMOE_SENTENCEPIECE_MODULE";
  });
  if (!error.empty()) throw std::runtime_error(error);
  return loaded;
}

}  // namespace

Tokenizer::Tokenizer(const std::string& path) : path_(path), sp_(module().create()) {
  // SentencePiece's own message for a missing file is terse; say which file and why.
  if (!std::ifstream(path).good()) throw std::runtime_error(path + ": cannot open tokenizer model");
  if (const std::string error = sp_->load(path); !error.empty()) {
    throw std::runtime_error(path + ": not a SentencePiece model (" + error + ")");
  }
  // piece_to_id answers unk for an unknown piece, hence the round trip through id_to_piece.
  const auto find_piece = [this](const char* piece) {
    const int id = sp_->piece_to_id(piece);
    return sp_->id_to_piece(id) == piece ? id : -1;
  };
  sep_id_ = find_piece(kSepPiece);
  newline_id_ = find_piece(kNewlinePiece);
  // Yuan's models carry "<eod>"; LLaMA-style models end documents with EOS ("</s>").
  if (const int eod = find_piece(kEodPiece); eod >= 0) {
    eod_id_ = eod;
  } else if (sp_->eos_id() >= 0) {
    eod_id_ = sp_->eos_id();
  } else {
    throw std::runtime_error(path + ": tokenizer has neither an \"<eod>\" piece nor an EOS id");
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  if (const std::string error = sp_->encode(text, &ids); !error.empty()) {
    throw std::runtime_error(path_ + ": encode failed: " + error);
  }
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::vector<int32_t> Tokenizer::encode_lines(std::string_view text) const {
  if (newline_id_ < 0) return encode(text);
  std::vector<int32_t> ids;
  for (size_t begin = 0;;) {
    const size_t end = std::min(text.find('\n', begin), text.size());
    const std::vector<int32_t> line = encode(text.substr(begin, end - begin));
    ids.insert(ids.end(), line.begin(), line.end());
    if (end == text.size()) return ids;
    ids.push_back(newline_id_);
    begin = end + 1;
  }
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const int64_t vocab = vocab_size();
  for (const int32_t id : ids) {
    if (id < 0 || id >= vocab) {
      throw std::out_of_range(path_ + ": token id " + std::to_string(id) + " outside the vocabulary [0, " +
                              std::to_string(vocab) + ")");
    }
  }
  // Each line on its own: SentencePiece drops the dummy-prefix space at the start of what it
  // decodes, and encode_lines gave every line one.
  std::string text;
  for (auto begin = ids.begin();;) {
    const auto end = std::find(begin, ids.end(), newline_id_);
    std::string line;
    if (const std::string error = sp_->decode(std::vector<int>(begin, end), &line); !error.empty()) {
      throw std::runtime_error(path_ + ": decode failed: " + error);
    }
    text += line;
    if (end == ids.end()) return text;
    text += '\n';
    begin = end + 1;
  }
}

std::string Tokenizer::piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw std::out_of_range(path_ + ": token id " + std::to_string(id) + " outside the vocabulary");
  }
  return sp_->id_to_piece(id);
}

int64_t Tokenizer::vocab_size() const { return sp_->piece_size(); }
int32_t Tokenizer::pad_id() const { return sp_->pad_id(); }
int32_t Tokenizer::unk_id() const { return sp_->unk_id(); }
int32_t Tokenizer::bos_id() const { return sp_->bos_id(); }
int32_t Tokenizer::eos_id() const { return sp_->eos_id(); }

void train_tokenizer(const SentenceSource& source, const std::string& model_prefix,
                     const TokenizerTrainOptions& options) {
  if (options.model_type != "bpe" && options.model_type != "unigram") {
    throw std::invalid_argument("tokenizer model type must be \"bpe\" or \"unigram\", got \"" +
                                options.model_type + "\"");
  }
  // Reserved pieces (4 + user-defined) + byte fallback (256) must leave room for learned pieces.
  if (options.vocab_size < 300) {
    throw std::invalid_argument("tokenizer vocabulary size must be >= 300, got " +
                                std::to_string(options.vocab_size));
  }
  // The LLaMA recipe: identity normalisation, no whitespace folding and byte fallback make the
  // tokenizer lossless (any UTF-8 round-trips, no <unk>); digits are split one per token.
  std::string user_defined;
  for (const auto& piece : options.user_defined_pieces) user_defined += (user_defined.empty() ? "" : ",") + piece;
  const std::unordered_map<std::string, std::string> args{
      {"model_prefix", model_prefix},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"model_type", options.model_type},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "3"},
      {"user_defined_symbols", user_defined},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"character_coverage", "0.9995"},
      {"input_sentence_size", std::to_string(options.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"max_sentence_length", std::to_string(options.max_sentence_bytes)},
      {"num_threads", std::to_string(std::max(1, options.num_threads))},
  };
  // An exception must not unwind through SentencePiece's frames: park it, end the stream, rethrow.
  std::exception_ptr failure;
  const detail::SentenceCallback next = [&](std::string& sentence) {
    try {
      return source(sentence);
    } catch (...) {
      failure = std::current_exception();
      return false;
    }
  };
  std::string error;
  module().train(args, next, static_cast<unsigned>(options.seed), &error);
  if (failure) std::rethrow_exception(failure);
  if (!error.empty()) throw std::runtime_error(model_prefix + ".model: tokenizer training failed: " + error);
}

}  // namespace yuanmoe::data
