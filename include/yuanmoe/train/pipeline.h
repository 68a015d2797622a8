// One optimizer step's forward and backward passes on this rank's pipeline stage, in the order
// of parallel::pipeline_schedule (docs/parallelism.md). With one stage the schedule is
// forward/backward per micro-batch: plain gradient accumulation, the same code.
//
// Per micro-batch i on stage s of p:
//   forward:  x = tokens (s = 0) or recv(activation from s-1); out = stage(x)
//             s = p-1: loss_i = CE(out) + aux_s;  else send(out -> s+1)
//   backward: s = p-1: (lm_scale_i * CE_i + aux_scale * aux_s).backward()
//             else   g = recv(grad from s+1); backward([out, aux_s], [g, aux_scale])
//             s > 0: send(x.grad -> s-1)
// so every stage's router terms reach the loss with the same 1/M scale; the LM loss of micro-batch
// i with the step's lm_scale_i (1/M, or its share of the step's counted labels). Every
// stage reads the same micro-batches (its dp rank's): positions and document ids
// (data.reset_attention_mask) are needed by every layer's RoPE, attention and LFA, tokens by the
// first stage, labels by the last. Activations travel as fp32 [B, S, D].
#pragma once

#include <functional>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::train {

struct PipelineStepOptions {
  config::PipelineSchedule schedule = config::PipelineSchedule::k1F1B;
  /// Per micro-batch of this rank: the scale of its LM loss (the mean over its counted labels)
  /// in the backward; one entry per micro-batch.
  std::vector<double> lm_loss_scales;
  double aux_loss_scale = 1.0;  // of every micro-batch's router terms: 1 / micro-batches
  config::Precision precision = config::Precision::kFp32;
  /// Called just before this stage's last backward of the step (the gradient buckets arm).
  std::function<void()> before_last_backward;
};

/// The sums and counts stay on the stage's device: reading them is the step's one wait for it.
struct PipelineStepResult {
  Tensor lm_losses_M;      // [M] fp64: each micro-batch's mean LM loss (last stage, else zeros)
  Tensor aux_loss_sum;     // [] fp64: this stage's router terms summed over micro-batches
  Tensor routed_pairs_LE;  // this stage's MoE layers [L_stage, E], int64; undefined if none
  double wall_seconds = 0.0;  // the whole schedule
  double wait_seconds = 0.0;  // blocked on other stages (receives, outstanding sends): the bubble
};

/// Runs the schedule over this rank's micro-batches; parameter gradients accumulate in .grad.
PipelineStepResult run_pipeline_step(model::TransformerImpl& stage_model, parallel::ParallelContext& parallel,
                                     const PipelineStepOptions& options, const std::vector<data::Batch>& batches);

/// Forward only, one micro-batch through every stage: the logits on the last stage, an
/// undefined tensor on the others (evaluation).
model::ModelOutput pipeline_forward(model::TransformerImpl& stage_model, parallel::ParallelContext& parallel,
                                    const data::Batch& batch, config::Precision precision);

}  // namespace yuanmoe::train
