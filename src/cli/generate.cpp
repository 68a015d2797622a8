// `yuanmoe generate --checkpoint DIR (--prompt TEXT | --prompts FILE) [--max-new-tokens N] [--temperature T]
//  [--top-k K] [--seed S]`
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "yuanmoe/checkpoint/model_loader.h"
#include "yuanmoe/cli/commands.h"
#include "yuanmoe/data/prepare.h"
#include "yuanmoe/data/tokenizer.h"
#include "yuanmoe/model/decode.h"

namespace yuanmoe::cli {

int run_generate(int argc, const char* const* argv) {
  cxxopts::Options options("yuanmoe generate",
                           "Continue a prompt with a checkpoint: KV cache + LFA state, one token per step.");
  options.add_options()
      ("checkpoint", kCheckpointOptionHelp, cxxopts::value<std::string>())
      ("prompt", "text to continue; with a <sep>, encoded as prepare-data --format sft-text encodes an instruction",
       cxxopts::value<std::string>())
      ("prompts", "a file of prompts, one per line: one JSON line each on stdout, {\"prompt\", \"completion\", "
       "\"tokens\", \"ended\"} (completion: the generated text alone; ended: it stopped at EOD)",
       cxxopts::value<std::string>())
      ("max-new-tokens", "tokens to generate at most", cxxopts::value<int64_t>()->default_value("64"))
      ("temperature", "softmax temperature; 0 = greedy", cxxopts::value<double>()->default_value("0.8"))
      ("top-k", "sample among the k most likely tokens; 0 = all", cxxopts::value<int64_t>()->default_value("40"))
      ("seed", "sampling seed", cxxopts::value<uint64_t>()->default_value("1234"));
  const auto parsed = parse_or_help(options, argc, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("checkpoint")) throw std::invalid_argument("--checkpoint DIR is required");
  if (args.count("prompt") == args.count("prompts")) {
    throw std::invalid_argument("exactly one of --prompt TEXT and --prompts FILE is required");
  }
  model::SamplingOptions sampling;
  sampling.max_new_tokens = args["max-new-tokens"].as<int64_t>();
  sampling.temperature = args["temperature"].as<double>();
  sampling.top_k = args["top-k"].as<int64_t>();
  sampling.seed = args["seed"].as<uint64_t>();
  if (sampling.max_new_tokens <= 0) throw std::invalid_argument("--max-new-tokens must be positive");
  if (sampling.temperature < 0) throw std::invalid_argument("--temperature must be >= 0");
  if (sampling.top_k < 0) throw std::invalid_argument("--top-k must be >= 0");

  checkpoint::LoadedModel loaded = checkpoint::load_model(args["checkpoint"].as<std::string>());
  const std::string tokenizer_path =
      !loaded.tokenizer.empty() ? loaded.tokenizer.string() : loaded.config.data.tokenizer;
  if (tokenizer_path.empty()) {
    throw std::invalid_argument(loaded.dir.string() + ": no tokenizer.model in the checkpoint and no data.tokenizer");
  }
  const data::Tokenizer tokenizer(tokenizer_path);
  sampling.eos_id = tokenizer.eod_id();
  const int64_t max_new_tokens = sampling.max_new_tokens;

  // The prompt's ids (where: for messages) -> the generated ids, up to EOD or the limits.
  const auto continue_prompt = [&](const std::string& text, const std::string& where) {
    const std::vector<int32_t> encoded = data::encode_prompt(tokenizer, text);
    if (encoded.empty()) throw std::invalid_argument(where + " encodes to no tokens");
    const std::vector<int64_t> prompt(encoded.begin(), encoded.end());
    const int64_t room = loaded.config.model.max_seq_length - static_cast<int64_t>(prompt.size());
    if (room <= 0) {
      throw std::invalid_argument(where + " is " + std::to_string(prompt.size()) + " tokens; model.max_seq_length is " +
                                  std::to_string(loaded.config.model.max_seq_length));
    }
    model::SamplingOptions options = sampling;
    options.max_new_tokens = std::min(max_new_tokens, room);
    return std::make_pair(encoded, model::generate(*loaded.model, prompt, options));
  };

  if (args.count("prompts")) {
    const std::string path = args["prompts"].as<std::string>();
    std::ifstream in(path);
    if (!in) throw std::invalid_argument(path + ": cannot open file");
    std::string line;
    int64_t count = 0;
    for (int64_t number = 1; std::getline(in, line); ++number) {
      if (line.empty()) continue;
      const auto [encoded, generated] = continue_prompt(line, path + ":" + std::to_string(number));
      const bool ended = !generated.empty() && generated.back() == sampling.eos_id;
      const std::vector<int32_t> completion(generated.begin(), generated.end() - (ended ? 1 : 0));
      std::cout << nlohmann::json{{"prompt", line},
                                  {"completion", tokenizer.decode(completion)},
                                  {"tokens", completion.size()},
                                  {"ended", ended}}
                       .dump()
                << "\n";
      ++count;
    }
    std::cerr << "(" << loaded.dir.string() << ", step " << loaded.progress.step << ": " << count << " prompts)\n";
    return 0;
  }

  const auto [encoded, generated] = continue_prompt(args["prompt"].as<std::string>(), "--prompt");
  std::vector<int32_t> all(encoded);
  all.insert(all.end(), generated.begin(), generated.end());
  std::cout << tokenizer.decode(all) << "\n";
  std::cerr << "(" << loaded.dir.string() << ", step " << loaded.progress.step << ": " << encoded.size()
            << " prompt + " << generated.size() << " generated tokens)\n";
  return 0;
}

}  // namespace yuanmoe::cli
