// data.loss_mask = sft and train.loss_average (docs/data.md, "Loss masks"; docs/training.md,
// "Loss"): the mask of packed SFT samples read through the sampler from a real indexed dataset
// against an explicit loop over documents; a masked label moves neither the loss nor a gradient;
// the per-token average over two data-parallel ranks (Gloo, ranks as threads) equals one process
// over the same global batch; on unmasked data the two averages agree.
#include <ATen/CPUGeneratorImpl.h>

#include <map>
#include <vector>

#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "support/temp_dir.h"
#include "yuanmoe/data/indexed_dataset.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/step.h"
#include "yuanmoe/train/token_layout.h"
#include "yuanmoe/train/training_data.h"

namespace yuanmoe::train {
namespace {

using testing::max_abs_diff;
using testing::on_ranks;
using testing::TempDir;

constexpr int32_t kEod = 0;
constexpr int32_t kSep = 1;

/// SFT documents as prepare-data writes them: instruction, <sep>, response, EOD.
const std::vector<std::vector<int32_t>>& sft_documents() {
  static const std::vector<std::vector<int32_t>> documents{
      {31, 32, kSep, 33, kEod},                  // 0..4
      {11, 12, 13, kSep, 21, 22, kEod},          // 5..11
      {14, 15, kSep, 23, kEod},                  // 12..16
      {16, 17, 18, 19, kSep, 24, 25, kEod},      // 17..24
      {41, kSep, 42, 43, 44, 45, kEod},          // 25..31
      {51, 52, 53, 54, 55, 56, kSep, 57, kEod},  // 32..40
      {61, 62, 63, 64, 65, 66, 67, kEod},        // 41..48: no <sep> (pretraining text): no instruction
      {71, 72, kSep, 73, kEod},                  // 49..53
  };
  return documents;
}

/// The sampler of an SFT source at `seq_length`: the mask on, samples in stream order (sample k
/// starts at token k * S).
data::SamplerOptions sft_options(int64_t seq_length) {
  data::SamplerOptions options;
  options.seq_length = seq_length;
  options.shuffle = false;
  options.eod_id = kEod;
  options.sep_id = kSep;
  options.sft_loss_mask = true;
  return options;
}

/// The explicit formulation: document by document, a token is an instruction token when it comes
/// before its document's first <sep>; a document without one has none. One flag per token of the
/// documents in file order.
std::vector<bool> instruction_flags(const std::vector<std::vector<int32_t>>& documents) {
  std::vector<bool> flags;
  for (const auto& document : documents) {
    const auto sep = std::find(document.begin(), document.end(), kSep);
    for (auto token = document.begin(); token != document.end(); ++token) {
      flags.push_back(sep != document.end() && token < sep);
    }
  }
  return flags;
}

// Every sample of the epoch at several sequence lengths, so that windows cut documents at their
// start (before and after the <sep>) and at their end (before and after it), and a document
// without <sep> keeps every label; at S = 9 sample 1
// (tokens 9..18) holds the end of document 1 (cut after its <sep>: response only), document 2
// whole, and the start of document 3 (cut before its <sep>: instruction only).
TEST(SftLossMask, PackedSamplesEqualAnExplicitLoopOverDocuments) {
  TempDir dir;
  {
    data::IndexedDatasetWriter writer(dir / "sft", data::DType::kUInt16);
    for (const auto& document : sft_documents()) writer.add_document(document.data(), document.size());
    writer.finish();
  }
  auto dataset = std::make_shared<const data::IndexedDataset>(dir / "sft");
  std::vector<int32_t> stream;
  for (const auto& document : sft_documents()) stream.insert(stream.end(), document.begin(), document.end());
  const std::vector<bool> instruction = instruction_flags(sft_documents());

  int64_t masked = 0, counted = 0;
  for (const int64_t seq_length : {4, 5, 6, 7, 9, 11, 13}) {
    data::GptSampler sampler(dataset, sft_options(seq_length));
    for (int64_t k = 0; k < sampler.samples_per_epoch(); ++k) {
      const data::Batch batch = sampler.next_batch();
      for (int64_t i = 0; i < seq_length; ++i) {
        const auto position = static_cast<size_t>(k * seq_length + i + 1);  // of label i in the stream
        const int64_t want = instruction[position] ? data::kIgnoredLabel : stream[position];
        EXPECT_EQ(batch.labels[0][i].item<int64_t>(), want) << "S " << seq_length << " sample " << k << " label " << i;
        EXPECT_EQ(batch.tokens[0][i].item<int64_t>(), stream[position - 1]);
        (want == data::kIgnoredLabel ? masked : counted) += 1;
      }
    }
  }
  EXPECT_GT(masked, 50);
  EXPECT_GT(counted, 50);

  // The case named above, spelled out: labels of tokens 10..18.
  data::SamplerOptions options = sft_options(9);
  data::GptSampler sampler(dataset, options);
  sampler.next_batch();
  const data::Batch batch = sampler.next_batch();
  // tokens 10..18: 22 EOD | 14 15 <sep> 23 EOD | 16 17
  const std::vector<int64_t> want{22, kEod, -100, -100, kSep, 23, kEod, -100, -100};
  EXPECT_TRUE(torch::equal(batch.labels[0], torch::tensor(want, torch::kLong))) << batch.labels;

  // No <sep> id, or the EOD's: the sampler refuses rather than mask nothing or everything.
  options.sep_id = -1;
  EXPECT_THROW(data::GptSampler(dataset, options), std::invalid_argument);
  options.sep_id = kEod;
  EXPECT_THROW(data::GptSampler(dataset, options), std::invalid_argument);
}

// A blend of an SFT source and a pretraining source (the official 16K mix), through the trainer's
// TrainingData: rows of the SFT source have their instructions masked, rows of the other source
// keep every label although their documents hold the same <sep>s.
TEST(SftLossMask, EachBlendSourceHasItsOwnMask) {
  TempDir dir;
  for (const auto& [name, shift] : std::vector<std::pair<std::string, int32_t>>{{"pairs", 0}, {"text", 100}}) {
    data::IndexedDatasetWriter writer(dir / name, data::DType::kUInt16);
    for (auto document : sft_documents()) {
      for (int32_t& token : document) token += token > kSep ? shift : 0;  // "text": tokens >= 100
      writer.add_document(document.data(), document.size());
    }
    writer.finish();
  }
  config::RunConfig run;
  run.model = testing::small_model_config();
  run.model.vocab_size = 200;
  run.train.seq_length = 16;
  run.data.eod_id = kEod;
  run.data.sep_id = kSep;
  run.data.blend = std::vector<config::BlendEntry>{{dir / "pairs", 1.0, "", "pairs", config::LossMask::kSft},
                                                   {dir / "text", 1.0, "", "text", std::nullopt}};
  parallel::ParallelContext single;
  TrainingData data(run, single.layout(), [](const std::string&) {});
  int64_t pairs_rows = 0, text_rows = 0;
  for (int i = 0; i < 12; ++i) {
    const data::Batch batch = data.next_batch();
    const bool text = (batch.tokens >= 100).any().item<bool>();
    const int64_t masked = (batch.labels == data::kIgnoredLabel).sum().item<int64_t>();
    if (text) {
      ++text_rows;
      EXPECT_EQ(masked, 0) << batch.labels;
    } else {
      ++pairs_rows;
      EXPECT_GT(masked, 0) << batch.labels;  // every 16-token window holds an instruction
    }
  }
  EXPECT_EQ(pairs_rows, 6);
  EXPECT_EQ(text_rows, 6);
}

/// fp64 loss and every parameter's gradient of the window of options.seq_length + 1 tokens at the
/// start of `stream` through `model`, masked as its documents in the stream say.
std::pair<double, std::map<std::string, Tensor>> loss_and_gradients(model::TransformerImpl& model,
                                                                    const std::vector<int64_t>& stream,
                                                                    const data::SamplerOptions& options) {
  std::vector<uint8_t> flags(stream.size());
  data::instruction_tokens(stream.data(), static_cast<int64_t>(stream.size()), kEod, kSep, flags.data());
  const auto window = static_cast<size_t>(options.seq_length) + 1;
  const std::vector<int64_t> sample(stream.begin(), stream.begin() + window);
  data::BatchBuilder builder(1, options.seq_length);
  builder.set_row(0, sample, options, "sample", std::vector<uint8_t>(flags.begin(), flags.begin() + window));
  const data::Batch batch = builder.finish(options);
  model.zero_grad(/*set_to_none=*/true);
  const model::ModelOutput out = model.forward(batch.tokens, token_layout(batch, torch::kCPU));
  const Tensor lm_loss = language_model_loss(out.out, batch.labels);
  const Tensor loss = out.aux_loss.defined() ? lm_loss + out.aux_loss : lm_loss;
  loss.backward();
  std::map<std::string, Tensor> gradients;
  for (const auto& p : model.named_parameters()) {
    if (p.value().grad().defined()) gradients[p.key()] = p.value().grad().clone();
  }
  return {loss.item<double>(), gradients};
}

// The last token of a window is a label only. Changed where it is an instruction token (masked),
// neither the loss nor any gradient moves, bit for bit; changed where it is a response token, both do.
TEST(SftLossMask, AMaskedLabelMovesNeitherTheLossNorAnyGradient) {
  torch::manual_seed(5);
  const config::ModelConfig model_config = testing::small_model_config();
  model::Transformer model(model_config, testing::small_moe_config());
  model::init_weights(*model, model_config, 7);
  model->to(torch::kDouble);
  data::SamplerOptions options = sft_options(12);
  options.reset_position_ids = true;
  options.reset_attention_mask = true;
  // ... EOD | 16 14 15 (<sep> 23 EOD after the window): the last label is an instruction token
  const std::vector<int64_t> instruction_last{45, 33, kEod, 11, 12, 13, kSep, 21, 22, kEod, 16, 14, 15, kSep, 23, kEod};
  // ... EOD | 14 15 <sep> 23 (EOD after the window): the last label is a response token
  const std::vector<int64_t> response_last{45, 33, kEod, 11, 12, 13, kSep, 21, 22, kEod, 14, 15, kSep, 23, kEod};

  const auto [loss, gradients] = loss_and_gradients(*model, instruction_last, options);
  std::vector<int64_t> changed = instruction_last;
  changed[12] = 60;  // the window's last token: a label only
  const auto [loss_changed, gradients_changed] = loss_and_gradients(*model, changed, options);
  EXPECT_EQ(loss, loss_changed);
  ASSERT_EQ(gradients.size(), gradients_changed.size());
  for (const auto& [name, grad] : gradients) EXPECT_TRUE(torch::equal(grad, gradients_changed.at(name))) << name;

  options.seq_length = 13;
  const auto [response_loss, response_gradients] = loss_and_gradients(*model, response_last, options);
  changed = response_last;
  changed[13] = 60;
  const auto [response_loss_changed, response_gradients_changed] = loss_and_gradients(*model, changed, options);
  EXPECT_GT(std::abs(response_loss - response_loss_changed), 1e-6);
  double moved = 0.0;
  for (const auto& [name, grad] : response_gradients) {
    moved = std::max(moved, max_abs_diff(grad, response_gradients_changed.at(name)));
  }
  EXPECT_GT(moved, 1e-6);
}

/// Micro-batch `index` of the global batch: random tokens, labels masked over the first
/// `masked[index]` positions of each row (unequal counts of counted labels).
data::Batch masked_micro_batch(int64_t index, const config::RunConfig& run, const std::vector<int64_t>& masked) {
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(100 + static_cast<uint64_t>(index));
  const int64_t rows = run.train.micro_batch_size, seq = run.train.seq_length;
  const Tensor stream = torch::randint(run.model.vocab_size, {rows, seq + 1}, generator, torch::kLong);
  Tensor labels = stream.narrow(1, 1, seq).clone();
  labels.narrow(1, 0, masked[static_cast<size_t>(index)]).fill_(data::kIgnoredLabel);
  return {stream.narrow(1, 0, seq).contiguous(), labels, model::default_position_ids(rows, seq).contiguous()};
}

struct StepOutcome {
  double loss = 0.0;
  std::map<std::string, Tensor> gradients;  // after the data-parallel reduction
};

/// One forward_backward of the step on micro-batches first, first + 1, ... of the global batch.
StepOutcome run_step(const config::RunConfig& run, parallel::ParallelContext& context, int64_t first,
                     const std::vector<int64_t>& masked) {
  model::Transformer model(run.model, run.moe);
  model::init_weights(*model, run.model, 3);
  if (run.train.precision == config::Precision::kFp64) model->to(torch::kDouble);
  DistributedOptimizer optimizer(*model, run.train, context, /*shard=*/false, parallel::expert_weights(*model));
  OptimizerStep step(run, *model, optimizer, context);
  int64_t next = first;
  const StepResult result = step.forward_backward(0, [&] { return masked_micro_batch(next++, run, masked); });
  StepOutcome outcome{result.loss, {}};
  for (const auto& p : model->named_parameters()) outcome.gradients[p.key()] = p.value().grad().clone();
  return outcome;
}

config::RunConfig loss_average_run(config::LossAverage average, config::Precision precision) {
  config::RunConfig run;
  run.model = testing::small_model_config();
  run.moe = testing::small_moe_config();
  run.moe.aux_loss_coeff = 0.01;
  run.train.seq_length = 8;
  run.train.micro_batch_size = 2;
  run.train.global_batch_size = 8;  // 4 micro-batches: 2 per rank at dp = 2
  run.train.loss_average = average;
  run.train.precision = precision;
  return run;
}

// train.loss_average = token at dp = 2, two micro-batches per rank with 16, 10, 6 and 4 counted
// labels: the reported loss and every gradient equal one process's over the four micro-batches.
// The micro_batch average of the same data differs (it weighs a label of a small micro-batch more).
TEST(LossAverage, TokenAtDp2EqualsOneProcessOverTheSameGlobalBatch) {
  const std::vector<int64_t> masked{0, 3, 5, 6};  // of 8 labels per row, 2 rows
  for (const auto& [precision, tolerance] :
       std::vector<std::pair<config::Precision, double>>{{config::Precision::kFp32, 1e-6},
                                                         {config::Precision::kFp64, 1e-12}}) {
    const config::RunConfig run = loss_average_run(config::LossAverage::kToken, precision);
    parallel::ParallelContext single;
    const StepOutcome whole = run_step(run, single, 0, masked);

    std::vector<StepOutcome> ranks(2);
    on_ranks(2, 1, [&](parallel::ParallelContext& context) {
      const int64_t r = context.layout().dp_rank;
      ranks[static_cast<size_t>(r)] = run_step(run, context, 2 * r, masked);
    });
    const std::string name = config::to_string(precision);
    for (const StepOutcome& rank : ranks) {
      EXPECT_NEAR(rank.loss, whole.loss, tolerance) << name;
      for (const auto& [key, grad] : whole.gradients) {
        EXPECT_LT(max_abs_diff(rank.gradients.at(key), grad), tolerance) << name << " " << key;
      }
    }
    // The explicit formula: every counted label's loss over the global batch / their count.
    model::Transformer model(run.model, run.moe);
    model::init_weights(*model, run.model, 3);
    if (precision == config::Precision::kFp64) model->to(torch::kDouble);
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t i = 0; i < 4; ++i) {
      const data::Batch batch = masked_micro_batch(i, run, masked);
      const Tensor logits = model->forward(batch.tokens, token_layout(batch, torch::kCPU)).out;
      const int64_t n = counted_labels(batch.labels);
      sum += language_model_loss(logits, batch.labels).item<double>() * static_cast<double>(n);
      count += n;
    }
    EXPECT_EQ(count, 16 + 10 + 6 + 4);
    EXPECT_NEAR(whole.loss, sum / static_cast<double>(count), tolerance) << name;

    const StepOutcome per_micro_batch =
        run_step(loss_average_run(config::LossAverage::kMicroBatch, precision), single, 0, masked);
    EXPECT_GT(std::abs(per_micro_batch.loss - whole.loss), 1e-4) << name;
  }
}

// Unmasked data (every micro-batch counts B * S = 16 labels, a power of two): token and
// micro_batch give the same loss and the same gradients, bit for bit, at dp = 1 and dp = 2.
TEST(LossAverage, TokenAndMicroBatchAgreeBitForBitOnUnmaskedData) {
  const std::vector<int64_t> unmasked{0, 0, 0, 0};
  const auto token = loss_average_run(config::LossAverage::kToken, config::Precision::kFp32);
  const auto micro_batch = loss_average_run(config::LossAverage::kMicroBatch, config::Precision::kFp32);
  parallel::ParallelContext single;
  const StepOutcome a = run_step(token, single, 0, unmasked), b = run_step(micro_batch, single, 0, unmasked);
  EXPECT_EQ(a.loss, b.loss);
  for (const auto& [key, grad] : a.gradients) EXPECT_TRUE(torch::equal(grad, b.gradients.at(key))) << key;

  std::vector<StepOutcome> token_ranks(2), micro_batch_ranks(2);
  on_ranks(2, 1, [&](parallel::ParallelContext& context) {
    const int64_t r = context.layout().dp_rank;
    token_ranks[static_cast<size_t>(r)] = run_step(token, context, 2 * r, unmasked);
    micro_batch_ranks[static_cast<size_t>(r)] = run_step(micro_batch, context, 2 * r, unmasked);
  });
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(token_ranks[r].loss, micro_batch_ranks[r].loss) << r;
    for (const auto& [key, grad] : token_ranks[r].gradients) {
      EXPECT_TRUE(torch::equal(grad, micro_batch_ranks[r].gradients.at(key))) << r << " " << key;
    }
  }
}

}  // namespace
}  // namespace yuanmoe::train
