// prepare-data: stream documents, tokenize them on worker threads, write train/valid MMIDIDX
// datasets in input order. Reading the next batch of documents overlaps with encoding the current
// one; memory stays bounded by two batches of `workers` chunks of kChunkBytes of text each.
#include "yuanmoe/data/prepare.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string_view>

#include "yuanmoe/data/tokenizer.h"

namespace yuanmoe::data {

namespace {

constexpr size_t kChunkBytes = 256 * 1024;  ///< text per worker task
constexpr size_t kReadBuffer = 1 << 20;     ///< ifstream buffer per input file

bool is_blank(const std::string& line) {
  return line.find_first_not_of(" \t\r\f\v") == std::string::npos;
}

bool has_suffix(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool jsonl_by_name(const std::string& path) {
  return has_suffix(path, ".jsonl") || has_suffix(path, ".ndjson") || has_suffix(path, ".json");
}

void check_input_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw std::runtime_error(path + ": cannot open input file (" + std::strerror(errno) + ")");
  }
  if (!S_ISREG(st.st_mode)) throw std::runtime_error(path + ": input is not a regular file");
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

InputFormat parse_input_format(const std::string& name) {
  if (name == "auto") return InputFormat::kAuto;
  if (name == "text") return InputFormat::kText;
  if (name == "jsonl") return InputFormat::kJsonl;
  if (name == "sft-text") return InputFormat::kSftText;
  if (name == "sft-jsonl") return InputFormat::kSftJsonl;
  throw std::invalid_argument(
      "--format: expected one of \"auto\", \"text\", \"jsonl\", \"sft-text\", \"sft-jsonl\", got \"" + name + "\"");
}

// ---------------------------------------------------------------------------------------------
// DocumentReader

struct DocumentReader::Stream {
  explicit Stream(const std::string& path) : path(path), buffer(kReadBuffer) {
    in.rdbuf()->pubsetbuf(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    in.open(path, std::ios::binary);
  }
  std::string path;
  std::vector<char> buffer;
  std::ifstream in;
  int64_t line = 0;
  InputFormat format = InputFormat::kText;
};

DocumentReader::DocumentReader(std::vector<std::string> files, InputFormat format)
    : files_(std::move(files)), format_(format) {}

DocumentReader::~DocumentReader() = default;

bool DocumentReader::open_next_file() {
  stream_.reset();
  if (file_index_ >= files_.size()) return false;
  const std::string& path = files_[file_index_++];
  check_input_file(path);
  stream_ = std::make_unique<Stream>(path);
  if (!stream_->in.is_open()) {
    throw std::runtime_error(path + ": cannot open input file (" + std::strerror(errno) + ")");
  }
  stream_->format = format_ != InputFormat::kAuto ? format_ : jsonl_by_name(path) ? InputFormat::kJsonl : InputFormat::kText;
  return true;
}

bool DocumentReader::next(Document& document) {
  std::string line;
  for (;;) {
    if (!stream_ && !open_next_file()) return false;
    Stream& s = *stream_;
    bool open_document = false;
    while (std::getline(s.in, line)) {
      ++s.line;
      bytes_read_ += static_cast<int64_t>(line.size()) + 1;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (is_blank(line)) {
        if (open_document) return true;  // a blank line closes a plain-text document
        continue;
      }
      if (s.format != InputFormat::kText) {  // a line per document (JSONL) or per sample (SFT)
        document.text = std::move(line);
        document.file = s.path;
        document.line = s.line;
        document.format = s.format;
        return true;
      }
      if (open_document) {
        document.text += '\n';
        document.text += line;
      } else {
        document.text = std::move(line);
        document.file = s.path;
        document.line = s.line;
        document.format = InputFormat::kText;
        open_document = true;
      }
    }
    if (s.in.bad()) throw std::runtime_error(s.path + ": read error at line " + std::to_string(s.line + 1));
    stream_.reset();
    if (open_document) return true;  // the file's last document needs no trailing blank line
  }
}

void parse_document(Document& document) {
  if (document.format != InputFormat::kJsonl) return;
  const std::string where = document.file + ":" + std::to_string(document.line) + ": ";
  nlohmann::json object;
  try {
    object = nlohmann::json::parse(document.text);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(where + "invalid JSON (" + e.what() + ")");
  }
  if (!object.is_object()) throw std::runtime_error(where + "expected a JSON object with a \"text\" field");
  const auto it = object.find("text");
  if (it == object.end()) throw std::runtime_error(where + "no \"text\" field");
  if (!it->is_string()) throw std::runtime_error(where + "\"text\" must be a string, got " + it->type_name());
  document.text = it->get<std::string>();
  document.format = InputFormat::kText;
}

namespace {

std::string replace_all(std::string text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

void parse_sft_text(const std::string& line, SftSample& sample) {
  const std::string_view sep = kSepPiece;
  const size_t at = line.find(sep);
  if (at == std::string::npos) {
    sample.problem = "no <sep> between instruction and response";
    return;
  }
  if (line.find(sep, at + sep.size()) != std::string::npos) {
    sample.problem = "more than one <sep>";
    return;
  }
  sample.prompt = replace_all(line.substr(0, at), kNewlinePiece, "\n");
  sample.response = replace_all(line.substr(at + sep.size()), kNewlinePiece, "\n");
}

void parse_sft_jsonl(const std::string& line, SftSample& sample) {
  nlohmann::json object;
  try {
    object = nlohmann::json::parse(line);
  } catch (const nlohmann::json::parse_error& e) {
    sample.problem = std::string("invalid JSON (") + e.what() + ")";
    return;
  }
  if (!object.is_object()) {
    sample.problem = "expected a JSON object with \"prompt\" and \"response\" strings";
    return;
  }
  for (const auto& [key, field] : {std::pair{"prompt", &sample.prompt}, std::pair{"response", &sample.response}}) {
    const auto it = object.find(key);
    if (it == object.end()) {
      sample.problem = fmt::format("no \"{}\" field", key);
      return;
    }
    if (!it->is_string()) {
      sample.problem = fmt::format("\"{}\" must be a string, got {}", key, it->type_name());
      return;
    }
    *field = it->get<std::string>();
  }
}

}  // namespace

SftSample parse_sft_sample(const Document& line) {
  SftSample sample;
  if (line.format == InputFormat::kSftText) {
    parse_sft_text(line.text, sample);
  } else if (line.format == InputFormat::kSftJsonl) {
    parse_sft_jsonl(line.text, sample);
  } else {
    throw std::logic_error(line.file + ":" + std::to_string(line.line) + ": not an SFT line");
  }
  if (sample.problem.empty() && is_blank(sample.response)) sample.problem = "empty response";
  return sample;
}

std::vector<int32_t> encode_sft_sample(const Tokenizer& tokenizer, const SftSample& sample) {
  if (tokenizer.sep_id() < 0) {
    throw std::runtime_error(tokenizer.path() + ": tokenizer has no \"<sep>\" piece to put between instruction and response");
  }
  std::vector<int32_t> ids = tokenizer.encode_lines(sample.prompt);
  ids.push_back(tokenizer.sep_id());
  const std::vector<int32_t> response = tokenizer.encode_lines(sample.response);
  ids.insert(ids.end(), response.begin(), response.end());
  ids.push_back(tokenizer.eod_id());
  return ids;
}

std::vector<int32_t> encode_prompt(const Tokenizer& tokenizer, const std::string& text) {
  const size_t at = text.find(kSepPiece);
  if (at == std::string::npos || tokenizer.sep_id() < 0) return tokenizer.encode(text);
  std::vector<int32_t> ids = tokenizer.encode_lines(replace_all(text.substr(0, at), kNewlinePiece, "\n"));
  ids.push_back(tokenizer.sep_id());
  const std::string response = text.substr(at + std::string_view(kSepPiece).size());
  if (!response.empty()) {
    const std::vector<int32_t> start = tokenizer.encode_lines(replace_all(response, kNewlinePiece, "\n"));
    ids.insert(ids.end(), start.begin(), start.end());
  }
  return ids;
}

// ---------------------------------------------------------------------------------------------
// prepare_data

namespace {

/// A batch of documents for one worker, and what it produced: the tokens of every kept document
/// (EOD included) back to back, each document's token count (0 = skipped, nothing encoded) and
/// why an SFT line is no sample (empty when it is one). The writer warns in input order, so
/// the warnings do not depend on the worker count.
struct Chunk {
  std::vector<Document> documents;
  std::vector<int32_t> tokens;
  std::vector<int64_t> lengths;
  std::vector<std::string> problems;
};

void encode_chunk(const Tokenizer& tokenizer, Chunk& chunk) {
  for (Document& document : chunk.documents) {
    std::vector<int32_t> ids;
    std::string problem;
    if (is_sft(document.format)) {
      const SftSample sample = parse_sft_sample(document);
      problem = sample.problem;
      if (problem.empty()) ids = encode_sft_sample(tokenizer, sample);
    } else {
      parse_document(document);
      ids = tokenizer.encode(document.text);
      if (!ids.empty()) ids.push_back(tokenizer.eod_id());
    }
    chunk.tokens.insert(chunk.tokens.end(), ids.begin(), ids.end());
    chunk.lengths.push_back(static_cast<int64_t>(ids.size()));
    chunk.problems.push_back(std::move(problem));
    std::string().swap(document.text);
  }
}

std::string format_name(InputFormat format) {
  switch (format) {
    case InputFormat::kAuto: return "auto";
    case InputFormat::kText: return "text";
    case InputFormat::kJsonl: return "jsonl";
    case InputFormat::kSftText: return "sft-text";
    case InputFormat::kSftJsonl: return "sft-jsonl";
  }
  return "?";
}

std::string where(const Document& document) { return document.file + ":" + std::to_string(document.line); }

/// Up to `count` chunks of about kChunkBytes of text each; empty at the end of the input.
std::vector<Chunk> read_chunks(DocumentReader& reader, int count) {
  std::vector<Chunk> chunks;
  Document document;
  for (int c = 0; c < count; ++c) {
    Chunk chunk;
    size_t bytes = 0;
    while (bytes < kChunkBytes && reader.next(document)) {
      bytes += document.text.size();
      chunk.documents.push_back(std::move(document));
      document = Document{};
    }
    if (chunk.documents.empty()) break;
    chunks.push_back(std::move(chunk));
  }
  return chunks;
}

void write_meta(const std::string& prefix, const std::string& split, const IndexedDatasetWriter& writer,
                const Tokenizer& tokenizer, const PrepareOptions& options) {
  const nlohmann::json meta{
      {"format", "yuanmoe.dataset.meta"},
      {"version", 1},
      {"split", split},
      {"documents", writer.num_documents()},
      {"sequences", writer.num_sequences()},
      {"tokens", writer.num_tokens()},
      {"dtype", dtype_name(writer.dtype())},
      {"tokenizer",
       {{"model", tokenizer.path()},
        {"vocab_size", tokenizer.vocab_size()},
        {"eod_id", tokenizer.eod_id()},
        {"pad_id", tokenizer.pad_id()},
        {"unk_id", tokenizer.unk_id()},
        {"bos_id", tokenizer.bos_id()},
        {"eos_id", tokenizer.eos_id()},
        {"sep_id", tokenizer.sep_id()},
        {"newline_id", tokenizer.newline_id()}}},
      {"sft", is_sft(options.format)},
      {"inputs", options.inputs},
      {"valid_fraction", options.valid_fraction},
  };
  const std::string path = meta_file_path(prefix);
  std::ofstream out(path);
  out << meta.dump(2) << "\n";
  if (!out) throw std::runtime_error(path + ": write failed");
}

void validate(const PrepareOptions& o) {
  if (o.inputs.empty()) throw std::invalid_argument("--input FILE is required");
  if (o.output_prefix.empty()) throw std::invalid_argument("--output PREFIX is required");
  if (o.tokenizer.empty() == (o.train_vocab_size <= 0)) {
    throw std::invalid_argument("exactly one of --tokenizer MODEL and --train-tokenizer VOCAB is required");
  }
  if (!(o.valid_fraction >= 0.0 && o.valid_fraction < 1.0)) {
    throw std::invalid_argument(fmt::format("--valid-fraction must be in [0, 1), got {}", o.valid_fraction));
  }
  if (o.workers < 1) throw std::invalid_argument("--workers must be >= 1, got " + std::to_string(o.workers));
  for (const auto& input : o.inputs) check_input_file(input);
}

/// Phase 1: a tokenizer trained on the input itself (its own streaming pass over the documents,
/// one sentence per line), written to PREFIX.model.
void train_tokenizer_on_input(const PrepareOptions& options, PrepareSummary& summary) {
  summary.tokenizer = options.output_prefix + ".model";
  const auto start = std::chrono::steady_clock::now();
  spdlog::info("prepare-data: training a {} tokenizer with {} pieces on {} input file(s)",
               options.tokenizer_type, options.train_vocab_size, options.inputs.size());
  DocumentReader reader(options.inputs, options.format);
  Document document;
  std::string pending;  // the current document's text, consumed line by line
  size_t position = 0;
  TokenizerTrainOptions train;
  const auto max_sentence = static_cast<size_t>(train.max_sentence_bytes);
  int64_t sentences = 0;
  int64_t too_long = 0;
  int64_t bad_samples = 0;  // left out here without a word: the tokenizing pass warns about each
  std::string first_bad;
  bool input_failed = false;  // the input's own error, not SentencePiece's, stopped training
  const SentenceSource source = [&](std::string& sentence) {
    for (;;) {
      while (position < pending.size()) {
        size_t end = pending.find('\n', position);
        if (end == std::string::npos) end = pending.size();
        const size_t begin = position;
        position = end + 1;
        if (end == begin) continue;
        if (end - begin > max_sentence) {
          ++too_long;
          continue;
        }
        sentence.assign(pending, begin, end - begin);
        ++sentences;
        return true;
      }
      try {
        if (!reader.next(document)) return false;
        parse_document(document);
      } catch (...) {
        input_failed = true;
        throw;
      }
      if (is_sft(document.format)) {
        SftSample sample = parse_sft_sample(document);
        if (!sample.problem.empty()) {
          if (bad_samples++ == 0) first_bad = where(document) + ": " + sample.problem;
          continue;
        }
        pending = std::move(sample.prompt) + "\n" + sample.response;
      } else {
        pending = std::move(document.text);
      }
      position = 0;
    }
  };
  train.vocab_size = options.train_vocab_size;
  train.model_type = options.tokenizer_type;
  train.max_sentences = options.tokenizer_max_sentences;
  train.num_threads = options.workers;
  try {
    train_tokenizer(source, options.output_prefix, train);
  } catch (const std::runtime_error&) {
    if (sentences == 0 && bad_samples > 0 && !input_failed) {
      throw std::runtime_error(fmt::format("{}: none of the {} samples is usable (the first: {}); no text to train a tokenizer on",
                                           join(options.inputs), bad_samples, first_bad));
    }
    if (sentences == 0 && !input_failed) throw std::runtime_error(join(options.inputs) + ": no text to train a tokenizer on");
    throw;
  }
  summary.tokenizer_train_seconds = seconds_since(start);
  spdlog::info("prepare-data: tokenizer {} trained on {} lines in {:.1f} s{}", summary.tokenizer,
               sentences, summary.tokenizer_train_seconds,
               too_long ? fmt::format(" ({} lines over {} bytes left out)", too_long, max_sentence)
                        : std::string());
}

/// Phase 2: every document tokenized (workers encode chunks in parallel) and written in input
/// order to the train or valid split.
void tokenize_and_write(const PrepareOptions& options, const Tokenizer& tokenizer, PrepareSummary& summary) {
  summary.train.prefix = options.output_prefix + "_train";
  IndexedDatasetWriter train(summary.train.prefix, summary.dtype);
  std::unique_ptr<IndexedDatasetWriter> valid;
  if (options.valid_fraction > 0) {
    summary.valid.prefix = options.output_prefix + "_valid";
    valid = std::make_unique<IndexedDatasetWriter>(summary.valid.prefix, summary.dtype);
  }
  const double f = options.valid_fraction;
  int64_t ordinal = 0;  // documents written so far, both splits
  const auto start = std::chrono::steady_clock::now();
  auto last_log = start;
  const auto progress = [&](const char* what) {
    const double elapsed = std::max(seconds_since(start), 1e-9);
    const int64_t tokens = train.num_tokens() + (valid ? valid->num_tokens() : 0);
    spdlog::info("prepare-data: {}{} documents, {} tokens, {:.1f} MB in {:.1f} s: {:.2f} MB/s, {:.0f} tokens/s",
                 what, ordinal, tokens, summary.input_bytes / 1e6, elapsed, summary.input_bytes / 1e6 / elapsed,
                 tokens / elapsed);
  };

  DocumentReader reader(options.inputs, options.format);
  std::vector<Chunk> current = read_chunks(reader, options.workers);
  while (!current.empty()) {
    std::vector<std::future<void>> encoding;
    for (Chunk& chunk : current) {
      encoding.push_back(std::async(std::launch::async, [&tokenizer, &chunk] { encode_chunk(tokenizer, chunk); }));
    }
    std::vector<Chunk> next = read_chunks(reader, options.workers);
    for (auto& task : encoding) task.get();  // rethrows the first failure in input order

    for (const Chunk& chunk : current) {
      const int32_t* tokens = chunk.tokens.data();
      for (size_t d = 0; d < chunk.documents.size(); ++d) {
        const int64_t length = chunk.lengths[d];
        if (!chunk.problems[d].empty()) {
          spdlog::warn("prepare-data: {}: {}; sample left out", where(chunk.documents[d]), chunk.problems[d]);
          ++summary.bad_samples;
          continue;
        }
        if (length == 0) {
          ++summary.skipped_documents;
          continue;
        }
        const bool to_valid = valid && std::floor((ordinal + 1) * f + 0.5) > std::floor(ordinal * f + 0.5);
        (to_valid ? *valid : train).add_document(tokens, static_cast<size_t>(length));
        tokens += length;
        ++ordinal;
      }
    }
    summary.input_bytes = reader.bytes_read();
    if (seconds_since(last_log) >= options.log_interval_s) {
      progress("");
      last_log = std::chrono::steady_clock::now();
    }
    current = std::move(next);
  }

  if (summary.bad_samples > 0) {
    spdlog::warn("prepare-data: sft: {} of {} samples left out", summary.bad_samples, summary.bad_samples + ordinal);
    if (ordinal == 0) {
      throw std::runtime_error(fmt::format("{}: none of the {} samples is usable (each is named in a warning above)",
                                           join(options.inputs), summary.bad_samples));
    }
  }
  if (ordinal == 0) throw std::runtime_error(join(options.inputs) + ": no documents in the input");
  train.finish();
  write_meta(summary.train.prefix, "train", train, tokenizer, options);
  summary.train.documents = train.num_documents();
  summary.train.tokens = train.num_tokens();
  if (valid) {
    valid->finish();
    write_meta(summary.valid.prefix, "valid", *valid, tokenizer, options);
    summary.valid.documents = valid->num_documents();
    summary.valid.tokens = valid->num_tokens();
    if (summary.valid.documents == 0) {
      spdlog::warn("prepare-data: {} documents are too few for --valid-fraction {}: {} is empty", ordinal, f,
                   summary.valid.prefix);
    }
  }
  summary.tokenize_seconds = seconds_since(start);
  progress("done: ");
}

}  // namespace

PrepareSummary prepare_data(const PrepareOptions& options) {
  validate(options);
  // --output data/corpus writes into data/: make it rather than fail on a missing directory.
  if (const std::filesystem::path parent = std::filesystem::path(options.output_prefix).parent_path(); !parent.empty()) {
    std::error_code error;
    std::filesystem::create_directories(parent, error);
    if (error) throw std::runtime_error(parent.string() + ": cannot create the output directory: " + error.message());
  }
  PrepareSummary summary;
  summary.tokenizer = options.tokenizer;
  if (options.train_vocab_size > 0) train_tokenizer_on_input(options, summary);
  const Tokenizer tokenizer(summary.tokenizer);
  summary.vocab_size = tokenizer.vocab_size();
  summary.eod_id = tokenizer.eod_id();
  summary.sep_id = tokenizer.sep_id();
  summary.newline_id = tokenizer.newline_id();
  summary.dtype = best_fitting_dtype(summary.vocab_size);
  spdlog::info("prepare-data: tokenizer {}: {} pieces, EOD id {} (\"{}\"), <sep> id {}, <n> id {}, token dtype {}",
               summary.tokenizer, summary.vocab_size, summary.eod_id, tokenizer.piece(summary.eod_id), summary.sep_id,
               summary.newline_id, dtype_name(summary.dtype));
  if (is_sft(options.format) && summary.sep_id < 0) {
    throw std::runtime_error(fmt::format(
        "{}: tokenizer has no \"<sep>\" piece, which --format {} puts between instruction and response "
        "(tokenizers trained by prepare-data have one)",
        summary.tokenizer, format_name(options.format)));
  }

  tokenize_and_write(options, tokenizer, summary);
  return summary;
}

std::optional<DatasetMeta> load_dataset_meta(const std::string& prefix) {
  const std::string path = meta_file_path(prefix);
  std::ifstream in(path);
  if (!in) return std::nullopt;
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    DatasetMeta meta;
    const auto& t = j.at("tokenizer");
    meta.tokenizer = t.at("model").get<std::string>();
    meta.vocab_size = t.at("vocab_size").get<int64_t>();
    meta.eod_id = t.at("eod_id").get<int64_t>();
    meta.pad_id = t.at("pad_id").get<int64_t>();
    meta.unk_id = t.at("unk_id").get<int64_t>();
    meta.sep_id = t.value("sep_id", int64_t{-1});
    meta.newline_id = t.value("newline_id", int64_t{-1});
    meta.sft = j.value("sft", false);
    meta.documents = j.at("documents").get<int64_t>();
    meta.tokens = j.at("tokens").get<int64_t>();
    meta.dtype = j.at("dtype").get<std::string>();
    return meta;
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": invalid dataset metadata (" + e.what() + ")");
  }
}

}  // namespace yuanmoe::data
