// A tiny training run for trainer tests: a synthetic corpus whose next token is predictable
// (each document counts up by a fixed stride), and a RunConfig small enough for milliseconds
// per step.
#pragma once

#include <random>
#include <string>

#include "support/fixtures.h"
#include "yuanmoe/config/config.h"
#include "yuanmoe/data/indexed_dataset.h"

namespace yuanmoe::testing {

constexpr int32_t kTinyEod = 0;

/// Documents of 10..40 tokens: start in [1, vocab), then + stride (mod vocab, skipping 0), EOD.
inline void write_counting_corpus(const std::string& prefix, int64_t documents, int64_t vocab, uint32_t seed,
                                  int32_t stride = 3) {
  data::IndexedDatasetWriter writer(prefix, data::DType::kUInt16);
  std::mt19937 rng(seed);
  for (int64_t d = 0; d < documents; ++d) {
    const int length = 10 + static_cast<int>(rng() % 31);
    int32_t token = 1 + static_cast<int32_t>(rng() % (vocab - 1));
    std::vector<int32_t> tokens;
    for (int i = 0; i < length; ++i) {
      tokens.push_back(token);
      token = 1 + (token - 1 + stride) % static_cast<int32_t>(vocab - 1);
    }
    tokens.push_back(kTinyEod);
    writer.add_document(tokens.data(), tokens.size());
  }
  writer.finish();
}

/// small_model_config / small_moe_config trained on `dir`/train, evaluated on `dir`/valid.
inline config::RunConfig tiny_run_config(const std::string& dir,
                                         config::RouterKind router = config::RouterKind::kAttention) {
  config::RunConfig run;
  run.model = small_model_config();
  run.moe = small_moe_config(router);
  run.train.seq_length = 16;
  run.train.micro_batch_size = 2;
  run.train.global_batch_size = 4;
  run.train.max_steps = 8;
  run.train.lr = 3e-3;
  run.train.min_lr = 3e-4;
  run.train.warmup_steps = 2;
  run.train.eval_interval = 0;
  run.train.eval_steps = 2;
  run.data.train_prefix = dir + "/train";
  run.data.valid_prefix = dir + "/valid";
  run.data.eod_id = kTinyEod;
  run.checkpoint.interval = 4;
  run.log.progress = false;
  run.log.plots = false;
  run.log.peak_tflops = 1.0;  // no start-up measurement in tests
  return run;
}

/// Writes train (200 documents) and valid (40) corpora under `dir`.
inline void write_tiny_corpora(const std::string& dir, int64_t vocab) {
  write_counting_corpus(dir + "/train", 200, vocab, 1);
  write_counting_corpus(dir + "/valid", 40, vocab, 2);
}

}  // namespace yuanmoe::testing
