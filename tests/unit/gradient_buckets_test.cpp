// Gradient buckets (train/gradient_buckets.h) on real Gloo groups, ranks as threads
// (support/on_ranks.h): the bucket order, collectives started from the hooks of the step's last
// backward only, ranks whose gradients arrive in different orders or not at all, and the whole
// step at dp=2 bit for bit the same with and without overlap (accumulation, sharding, recompute,
// the tied embedding over two stages).
#include <ATen/CPUGeneratorImpl.h>

#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/recompute.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/gradient_buckets.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/step.h"

namespace yuanmoe::train {
namespace {

using testing::on_ranks;

/// `count` leaf parameters of `elements` fp32 values each, named p0, p1, ...
std::pair<std::vector<Tensor>, std::vector<std::string>> leaves(size_t count, int64_t elements) {
  std::vector<Tensor> parameters;
  std::vector<std::string> names;
  for (size_t i = 0; i < count; ++i) {
    parameters.push_back(torch::full({elements}, 1.0 + static_cast<double>(i)).requires_grad_(true));
    names.push_back("p" + std::to_string(i));
  }
  return {parameters, names};
}

/// A backward that reaches the parameters listed, last one first (a chain: x * p_a * p_b * ...),
/// with gradients that depend on `scale`.
void backward_through(const std::vector<Tensor>& parameters, const std::vector<size_t>& used, double scale) {
  Tensor x = torch::full_like(parameters.front(), scale);
  for (size_t i : used) x = x * parameters[i];
  x.sum().backward();
}

/// finish(), each bucket's mean kept.
std::vector<Tensor> finish(GradientBuckets& buckets) {
  std::vector<Tensor> means(buckets.buckets().size());
  buckets.finish([&](size_t b, const Tensor& mean) { means[b] = mean.clone(); });
  return means;
}

TEST(GradientBucketsTest, ReverseRegistrationOrderCutAtTheBucketSizeTheHeldOneLast) {
  auto [parameters, names] = leaves(5, 4);  // 16 bytes each
  const parallel::Group alone;
  GradientBuckets buckets(parameters, names, /*held=*/0, alone, alone, /*dp=*/1, /*overlap=*/true,
                          /*bucket_bytes=*/32);
  const std::vector<GradientBucket>& b = buckets.buckets();
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0].parameters, (std::vector<size_t>{4, 3}));  // filled once it holds 32 bytes
  EXPECT_EQ(b[1].parameters, (std::vector<size_t>{2, 1}));
  EXPECT_EQ(b[2].parameters, (std::vector<size_t>{0}));
  EXPECT_TRUE(b[2].held);
  EXPECT_EQ(b[0].offsets, (std::vector<int64_t>{0, 4}));
  EXPECT_FALSE(buckets.active());  // one copy, no group: nothing to reduce
}

// Micro-batches 1 and 2 accumulate; only the last backward's hooks start collectives, and they
// start every bucket (the ranks' gradients all arrive); off, none starts before finish().
TEST(GradientBucketsTest, OnlyTheLastBackwardStartsBucketsAndTheMeanIsOfTheAccumulatedSums) {
  on_ranks(2, 1, [](parallel::ParallelContext& context) {
    const double rank = static_cast<double>(context.world().rank);
    for (const bool overlap : {true, false}) {
      auto [parameters, names] = leaves(4, 3);
      GradientBuckets buckets(parameters, names, -1, context.dp, parallel::Group(), 2, overlap, /*bucket_bytes=*/12);
      ASSERT_EQ(buckets.buckets().size(), 4u);
      const std::vector<size_t> all{0, 1, 2, 3};
      backward_through(parameters, all, 1.0 + rank);  // micro-batch 1 accumulates ...
      buckets.arm();                                 // ... and 2 is the last
      EXPECT_EQ(buckets.started(), 0u);
      backward_through(parameters, all, 2.0 + rank);
      EXPECT_EQ(buckets.started(), overlap ? 4u : 0u);
      const std::vector<Tensor> means = finish(buckets);
      EXPECT_EQ(buckets.started(), 4u);
      // d/dp_i of s * prod(p) = s * prod(p) / p_i; prod = 24. Summed over micro-batches and
      // ranks, over dp = 2: (1 + 2 + 2 + 3) / 2 * 24 / p_i.
      for (size_t b = 0; b < 4; ++b) {
        const size_t i = buckets.buckets()[b].parameters.front();
        const Tensor want = torch::full({3}, 4.0 * 24.0 / (1.0 + static_cast<double>(i)));
        EXPECT_TRUE(torch::allclose(means[b], want)) << "p" << i << (overlap ? " overlap" : "");
      }
    }
  });
}

// Rank 1's backward never reaches p1 and reaches the others in another order: its bucket waits,
// so do the ones after it (collectives start in bucket order on every rank), and finish() reduces
// p1 with rank 1's zeros. No rank starts a collective the other does not.
TEST(GradientBucketsTest, RanksWhoseGradientsArriveDifferentlyReduceTheSameBuckets) {
  on_ranks(2, 1, [](parallel::ParallelContext& context) {
    const int64_t rank = context.world().rank;
    auto [parameters, names] = leaves(4, 3);
    GradientBuckets buckets(parameters, names, -1, context.dp, parallel::Group(), 2, true, /*bucket_bytes=*/1);
    buckets.arm();
    backward_through(parameters, rank == 0 ? std::vector<size_t>{0, 1, 2, 3} : std::vector<size_t>{3, 0, 2}, 1.0);
    // Buckets hold p3, p2, p1, p0: rank 1 can start p3's and p2's, then waits for p1's.
    EXPECT_EQ(buckets.started(), rank == 0 ? 4u : 2u);
    const std::vector<Tensor> means = finish(buckets);
    const std::vector<double> rank0{24.0, 12.0, 8.0, 6.0};  // prod / p_i, prod = 24
    for (size_t b = 0; b < 4; ++b) {
      const size_t i = buckets.buckets()[b].parameters.front();
      const double other = i == 1 ? 0.0 : 12.0 / (1.0 + static_cast<double>(i));  // rank 1: prod = 12
      EXPECT_TRUE(torch::allclose(means[b], torch::full({3}, (rank0[i] + other) / 2.0))) << "p" << i;
    }
  });
}

TEST(GradientBucketsTest, ASecondGradientInTheLastBackwardIsRefused) {
  on_ranks(2, 1, [](parallel::ParallelContext& context) {
    auto [parameters, names] = leaves(2, 3);
    GradientBuckets buckets(parameters, names, -1, context.dp, parallel::Group(), 2, true, /*bucket_bytes=*/1);
    buckets.arm();
    // Two backward calls in one armed phase: p1's bucket started after the first, so the second
    // gradient could not reach the sum any more and is refused.
    backward_through(parameters, {1}, 1.0);
    try {
      backward_through(parameters, {1}, 1.0);
      ADD_FAILURE() << "expected an error";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("p1: a second gradient"), std::string::npos) << e.what();
    }
    backward_through(parameters, {0}, 1.0);
    finish(buckets);  // every rank still reduces both buckets
  });
}

// ---------------------------------------------------------------------------------------------
// The whole step at dp=2, overlap on against off: the same losses, norms and weights, bit for bit.

struct StepFigures {
  std::vector<double> losses, norms;
  std::map<std::string, Tensor> weights;
};

StepFigures train_three_steps(const config::RunConfig& run, parallel::ParallelContext& context, bool overlap) {
  model::Transformer model(run.model, run.moe,
                           model::balanced_stage(run.model.num_layers, context.layout().pp, context.layout().stage));
  model::init_weights(*model, run.model, 5);
  model::apply_recompute(*model, run.train.recompute);
  model->train();
  DistributedOptimizer optimizer(*model, run.train, context, run.parallel.shard_optimizer,
                                 parallel::expert_weights(*model), overlap, /*bucket_bytes=*/64 << 10);
  OptimizerStep step(run, *model, optimizer, context);
  StepFigures out;
  const int64_t rows = run.train.micro_batch_size, seq = run.train.seq_length;
  for (int64_t completed = 0; completed < 3; ++completed) {
    int64_t micro_batch = 0;
    const auto next_batch = [&] {
      const auto seed = static_cast<uint64_t>((completed * 16 + micro_batch++) * 4 + context.layout().dp_rank);
      at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
      const Tensor stream = torch::randint(run.model.vocab_size, {rows, seq + 1}, generator, torch::kLong);
      return data::Batch{stream.narrow(1, 0, seq).contiguous(), stream.narrow(1, 1, seq).contiguous(),
                         model::default_position_ids(rows, seq).contiguous(), Tensor()};
    };
    const StepResult result = step.run(completed, next_batch);
    out.losses.push_back(result.loss);
    out.norms.push_back(result.grad_norm);
  }
  for (const auto& item : model->named_parameters()) out.weights[item.key()] = item.value().detach().clone();
  return out;
}

void expect_overlap_changes_no_bit(const std::vector<std::string>& overrides, int64_t stages) {
  config::RunConfig run;
  run.model = testing::small_model_config();
  run.moe = testing::small_moe_config();
  run.moe.aux_loss_coeff = 0.01;
  run.train.seq_length = 16;
  run.train.micro_batch_size = 1;
  run.train.global_batch_size = 4;  // 2 micro-batches per rank: accumulation before the last backward
  run.train.lr = 1e-2;
  run.train.warmup_steps = 0;
  for (const std::string& o : overrides) {
    if (o == "shard") run.parallel.shard_optimizer = true;
    if (o == "recompute") run.train.recompute = true;
  }
  on_ranks(2 * stages, stages, [&](parallel::ParallelContext& context) {
    const StepFigures on = train_three_steps(run, context, true), off = train_three_steps(run, context, false);
    EXPECT_EQ(on.losses, off.losses);
    EXPECT_EQ(on.norms, off.norms);
    for (const auto& [name, weight] : off.weights) EXPECT_TRUE(torch::equal(on.weights.at(name), weight)) << name;
  });
}

TEST(GradientBucketsTest, OverlapChangesNoBitOfTheStepAtDp2) { expect_overlap_changes_no_bit({}, 1); }
TEST(GradientBucketsTest, OverlapChangesNoBitOfTheShardedStepWithRecompute) {
  expect_overlap_changes_no_bit({"shard", "recompute"}, 1);
}
// dp=2 x pp=2: each stage's last backward comes at a different point of the 1F1B schedule, and
// the tied embedding's copies are summed over the stages before their held bucket starts.
TEST(GradientBucketsTest, OverlapChangesNoBitOfTheStepAtDp2Pp2) { expect_overlap_changes_no_bit({}, 2); }

}  // namespace
}  // namespace yuanmoe::train
