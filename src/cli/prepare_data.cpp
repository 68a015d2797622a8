// `yuanmoe prepare-data`: text / JSONL -> Megatron indexed datasets (see yuanmoe/data/prepare.h
// for the formats and docs/data.md for the walk-through).
#include <cxxopts.hpp>
#include <iostream>
#include <spdlog/fmt/fmt.h>
#include <thread>

#include "yuanmoe/cli/commands.h"
#include "yuanmoe/data/prepare.h"

namespace yuanmoe::cli {

int run_prepare_data(int argc, const char* const* argv) {
  cxxopts::Options options(
      "yuanmoe prepare-data",
      "Tokenize text or JSONL into Megatron-LM indexed datasets PREFIX_train and PREFIX_valid.\n"
      "Plain text: documents are separated by blank lines. JSONL (.jsonl/.ndjson/.json): one\n"
      "object per line, the document is its \"text\" field. Each document ends with EOD.\n"
      "Instruction data: --format sft-text (a line is instruction<sep>response, <n> = newline) or\n"
      "sft-jsonl (a line is an object with \"prompt\" and \"response\"); a sample is the document\n"
      "prompt <sep> response EOD.");
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  options.add_options()
      ("input", "input file (repeatable; files are read in order)", cxxopts::value<std::vector<std::string>>())
      ("output", "output prefix: writes PREFIX_{train,valid}.{bin,idx,meta.json}", cxxopts::value<std::string>())
      ("tokenizer", "existing SentencePiece model", cxxopts::value<std::string>())
      ("train-tokenizer", "train PREFIX.model with VOCAB pieces on the input first", cxxopts::value<int64_t>())
      ("tokenizer-type", "model type of a trained tokenizer: bpe | unigram",
       cxxopts::value<std::string>()->default_value("bpe"))
      ("format", "input format: auto (by extension) | text | jsonl | sft-text | sft-jsonl",
       cxxopts::value<std::string>()->default_value("auto"))
      ("valid-fraction", "share of documents in the validation split (0 = none)",
       cxxopts::value<double>()->default_value("0.02"))
      ("workers", "tokenizing threads", cxxopts::value<int>()->default_value(std::to_string(cores)))
      ("log-interval", "seconds between progress lines", cxxopts::value<double>()->default_value("10"));
  // `--input a.txt b.jsonl`: the words after --input that are not options are inputs too.
  options.parse_positional({"input"});
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.unmatched().empty()) {
    throw std::invalid_argument("unexpected argument '" + args.unmatched().front() + "' (inputs take --input)");
  }

  data::PrepareOptions o;
  if (args.count("input")) o.inputs = args["input"].as<std::vector<std::string>>();
  if (args.count("output")) o.output_prefix = args["output"].as<std::string>();
  if (args.count("tokenizer")) o.tokenizer = args["tokenizer"].as<std::string>();
  if (args.count("train-tokenizer")) {
    o.train_vocab_size = args["train-tokenizer"].as<int64_t>();
    if (o.train_vocab_size <= 0) {
      throw std::invalid_argument("--train-tokenizer: vocabulary size must be > 0, got " +
                                  std::to_string(o.train_vocab_size));
    }
  }
  o.tokenizer_type = args["tokenizer-type"].as<std::string>();
  o.format = data::parse_input_format(args["format"].as<std::string>());
  o.valid_fraction = args["valid-fraction"].as<double>();
  o.workers = args["workers"].as<int>();
  o.log_interval_s = args["log-interval"].as<double>();

  const data::PrepareSummary s = data::prepare_data(o);
  const double mb = s.input_bytes / 1e6;
  const int64_t tokens = s.train.tokens + s.valid.tokens;
  std::cout << "tokenizer: " << s.tokenizer << " (" << s.vocab_size << " pieces, EOD id " << s.eod_id
            << (data::is_sft(o.format) ? ", <sep> id " + std::to_string(s.sep_id) : std::string())
            << ", dtype " << data::dtype_name(s.dtype) << ")\n"
            << "train: " << s.train.prefix << " " << with_thousands(s.train.documents) << " documents, "
            << with_thousands(s.train.tokens) << " tokens\n";
  if (!s.valid.prefix.empty()) {
    std::cout << "valid: " << s.valid.prefix << " " << with_thousands(s.valid.documents) << " documents, "
              << with_thousands(s.valid.tokens) << " tokens\n";
  }
  if (s.skipped_documents) std::cout << "skipped: " << s.skipped_documents << " empty documents\n";
  if (s.bad_samples) std::cout << "left out: " << s.bad_samples << " lines that are no sample (warned about above)\n";
  if (s.tokenizer_train_seconds > 0) {
    std::cout << "tokenizer training: " << fmt::format("{:.1f}", s.tokenizer_train_seconds) << " s\n";
  }
  std::cout << fmt::format("tokenizing: {:.1f} MB in {:.2f} s with {} workers: {:.2f} MB/s, {:.0f} tokens/s\n", mb,
                           s.tokenize_seconds, o.workers, mb / s.tokenize_seconds, tokens / s.tokenize_seconds);
  return 0;
}

}  // namespace yuanmoe::cli
