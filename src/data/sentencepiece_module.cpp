// The SentencePiece module (libyuanmoe_sentencepiece.so): the only code that includes or links
// SentencePiece. See sentencepiece_backend.h for why it lives in its own dlopen'ed library.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "sentencepiece_backend.h"

namespace sentencepiece::logging {
void SetMinLogLevel(int level);  // exported by libsentencepiece, not declared in its public headers
}

namespace yuanmoe::data::detail {
namespace {

/// Silences SentencePiece's logging except FATAL, before any other call. All of it goes through
/// std::cerr, and under RTLD_DEEPBIND this library's std::cerr is libstdc++'s own copy of the
/// stream, which is never initialised (the executable holds the live, copy-relocated one): one
/// log line would crash. Every failure still reaches the caller as a status message.
__attribute__((constructor)) void silence_logging() { sentencepiece::logging::SetMinLogLevel(3); }

std::string message(const sentencepiece::util::Status& status) {
  return status.ok() ? std::string() : status.ToString();
}

class Backend final : public SentencePieceBackend {
 public:
  std::string load(const std::string& path) override { return message(sp_.Load(path)); }
  std::string encode(std::string_view text, std::vector<int>* ids) const override {
    return message(sp_.Encode(text, ids));
  }
  std::string decode(const std::vector<int>& ids, std::string* text) const override {
    return message(sp_.Decode(ids, text));
  }
  int piece_size() const override { return sp_.GetPieceSize(); }
  int piece_to_id(const std::string& piece) const override { return sp_.PieceToId(piece); }
  std::string id_to_piece(int id) const override { return sp_.IdToPiece(id); }
  int unk_id() const override { return sp_.unk_id(); }
  int bos_id() const override { return sp_.bos_id(); }
  int eos_id() const override { return sp_.eos_id(); }
  int pad_id() const override { return sp_.pad_id(); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

/// Adapts the callback to SentencePiece's pull iterator.
class CallbackIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit CallbackIterator(const SentenceCallback& next) : next_(next) { Next(); }
  bool done() const override { return done_; }
  void Next() override { done_ = !next_(value_); }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const SentenceCallback& next_;
  std::string value_;
  bool done_ = false;
};

}  // namespace
}  // namespace yuanmoe::data::detail

extern "C" __attribute__((visibility("default"))) yuanmoe::data::detail::SentencePieceBackend*
yuanmoe_spm_create() {
  return new yuanmoe::data::detail::Backend();
}

extern "C" __attribute__((visibility("default"))) void yuanmoe_spm_train(
    const std::unordered_map<std::string, std::string>& args,
    const yuanmoe::data::detail::SentenceCallback& sentences, unsigned seed, std::string* error) {
  // Sentence sampling draws from SentencePiece's process-wide generator (no TrainerSpec field).
  sentencepiece::SetRandomGeneratorSeed(seed);
  yuanmoe::data::detail::CallbackIterator iterator(sentences);
  *error = yuanmoe::data::detail::message(sentencepiece::SentencePieceTrainer::Train(args, &iterator));
}
