// AdamW over the parameters this rank holds, reduced and optionally sharded as the layout says
// (docs/parallelism.md, "Gradients and the optimizer"):
//
//   parameter                   copies on            gradient reduced over   divided by
//   dense (attention, router)   every dp rank        dp group                dp
//   experts, parallel.expert>1  the edp ranks        edp group               dp (*)
//
//   (*) an expert's gradient on one rank already sums the tokens of its whole ep group.
//
// Gradients are reduced in buckets of about 25 MB (train/gradient_buckets.h: overlapped with the
// step's last backward under parallel.overlap_grad_reduce), and each group's copies share the AdamW
// work as parallel.shard_optimizer says (ZeRO-1, Megatron's distributed optimizer): sharded, each
// bucket is reduce-scattered over the group, so rank r of a group of g holds the reduced gradient
// of the bucket's chunk r, AdamW updates that chunk only (its moments are the only ones the rank
// keeps: 1/g of them) and the chunks are all-gathered back into the parameters. Not sharded is
// the same over a shard group of one: each bucket is all-reduced, its one chunk is the whole
// bucket, and the reduced gradients are the parameters' own. Parameters stay fp32 on every rank:
// under bf16 autocast they are the master weights, and every rank's forward reads them.
//
// The state is read and written by parameter name in the global layout (every expert by global
// index, whole tensors), whatever the sharding, so a checkpoint moves between layouts.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/adamw.h"
#include "yuanmoe/train/gradient_buckets.h"

namespace yuanmoe::train {

class DistributedOptimizer {
 public:
  /// `model`: this rank's stage, already on its device and with expert parallelism applied
  /// (`experts` is what apply_expert_parallel returned). Sharding views the parameters' storage:
  /// nothing may replace it afterwards (load_model_state copies in place). `overlap_reduction`
  /// and `bucket_bytes`: parallel.overlap_grad_reduce and grad_bucket_mb.
  DistributedOptimizer(model::TransformerImpl& model, const config::TrainConfig& train,
                       const parallel::ParallelContext& parallel, bool shard, parallel::ExpertSharding experts,
                       bool overlap_reduction = true, int64_t bucket_bytes = GradientBuckets::kDefaultBucketBytes);
  ~DistributedOptimizer();

  void set_learning_rate(double lr);
  /// Before the step's last backward on this stage: with overlap on, its gradient hooks start
  /// reducing each bucket as soon as it is complete.
  void reduce_during_next_backward();
  /// After the backward passes: the tied embedding's copies summed, then every gradient
  /// reduced to the data-parallel mean: this rank's chunks when sharded, else the parameters'
  /// .grad, as views of the reduced buckets (a missing one becomes zeros first when there is
  /// anything to reduce).
  void reduce_gradients();
  /// The gradients AdamW steps with, once reduced: the parameters' own, or this rank's reduced
  /// chunks when sharded.
  std::vector<Tensor> gradients() const;
  /// Seconds spent in reduce_gradients() reducing after the backward, summed over the run, and
  /// of those, waiting for collectives: the communication that the backward did not hide
  /// (docs/parallelism.md).
  struct ReductionSeconds {
    double after_backward = 0.0, waiting = 0.0;
  };
  ReductionSeconds reduction_seconds() const;
  /// The square of the L2 norm of the whole model's reduced gradient: every stage, every expert
  /// once, the last stage's tied copy left out (fp64 sums). [] fp64 on the parameters' device,
  /// not read back (the step reads it with its other figures). A collective.
  Tensor squared_gradient_norm() const;
  /// Scales the gradients when max_norm > 0 and norm exceeds it, AdamW, and when sharded the
  /// updated chunks all-gathered into the parameters.
  void step(double max_norm, double norm);

  /// "{name}/exp_avg", "{name}/exp_avg_sq", "{name}/step" of every parameter with state, whole
  /// tensors in the global expert layout, on the CPU. A collective over the stage's groups.
  checkpoint::NamedTensors state_by_name() const;
  /// The inverse, from global-layout entries of this stage. Throws naming `source` and the
  /// entry when one is unknown, incomplete or of another shape.
  void load_state_by_name(const checkpoint::NamedTensors& global, const std::string& source);

  /// Bytes of AdamW state (moments) this rank holds now, summed from the live tensors.
  int64_t state_bytes() const;
  const parallel::ExpertSharding& experts() const { return experts_; }
  bool sharded() const { return shard_; }

 private:
  struct Layout;  // buckets, chunks and pieces (distributed_optimizer.cpp)
  model::TransformerImpl& model_;
  const parallel::ParallelContext& parallel_;
  const bool shard_;
  const parallel::ExpertSharding experts_;
  std::unique_ptr<Layout> layout_;
  std::unique_ptr<AdamW> adamw_;  // its parameter i is Layout::pieces[i]
};

}  // namespace yuanmoe::train
