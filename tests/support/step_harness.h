// One optimizer step of a config at a time, as `yuanmoe train` and `yuanmoe bench` run it
// (train/step.h), on random micro-batches in host memory that the step copies to the device.
// Two harnesses of one config and seed see the same weights and the same batches; the optimizer
// is sharded and overlaps its reduction as run.parallel says (no expert parallelism).
#pragma once

#include <ATen/CPUGeneratorImpl.h>

#include <memory>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/distributed_optimizer.h"
#include "yuanmoe/train/step.h"

namespace yuanmoe::testing {

class StepHarness {
 public:
  StepHarness(const config::RunConfig& run, const torch::Device& device,
              parallel::ParallelContext parallel = parallel::ParallelContext())
      : run_(run), parallel_(std::move(parallel)), model_(run.model, run.moe) {
    model::init_weights(*model_, run_.model, static_cast<uint64_t>(run_.train.seed));
    model_->to(device);
    model_->train();
    optimizer_ = std::make_unique<train::DistributedOptimizer>(*model_, run_.train, parallel_,
                                                               run_.parallel.shard_optimizer,
                                                               parallel::expert_weights(*model_),
                                                               run_.parallel.overlap_grad_reduce,
                                                               train::bucket_bytes(run_.parallel));
    step_ = std::make_unique<train::OptimizerStep>(run_, *model_, *optimizer_, parallel_);
  }
  StepHarness(const StepHarness&) = delete;
  StepHarness& operator=(const StepHarness&) = delete;

  /// The next optimizer step; its micro-batches are drawn from a generator seeded by the step.
  train::StepResult step() {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(1000 + static_cast<uint64_t>(completed_));
    const int64_t rows = run_.train.micro_batch_size, seq = run_.train.seq_length;
    const auto next_batch = [&] {
      const Tensor stream = torch::randint(run_.model.vocab_size, {rows, seq + 1}, generator, torch::kLong);
      return data::Batch{stream.narrow(1, 0, seq).contiguous(), stream.narrow(1, 1, seq).contiguous(),
                         model::default_position_ids(rows, seq).contiguous(), Tensor()};
    };
    return step_->run(completed_++, next_batch);
  }

  model::TransformerImpl& model() { return *model_; }

 private:
  const config::RunConfig run_;
  parallel::ParallelContext parallel_;
  model::Transformer model_;
  std::unique_ptr<train::DistributedOptimizer> optimizer_;
  std::unique_ptr<train::OptimizerStep> step_;
  int64_t completed_ = 0;
};

}  // namespace yuanmoe::testing
