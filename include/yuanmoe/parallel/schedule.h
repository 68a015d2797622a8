// Pipeline schedules as explicit action lists (docs/parallelism.md; Narayanan et al.
// 2021, Megatron-LM schedules.py). A stage runs its list in order; the communication each action
// implies (receive the input activation before a forward unless first stage, send the output
// after it unless last; receive the output gradient before a backward unless last stage, send
// the input gradient after it unless first) is done by the executor (train/pipeline.h). Pure
// functions: testable without tensors or processes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "yuanmoe/config/config.h"

namespace yuanmoe::parallel {

struct PipelineAction {
  enum Kind { kForward, kBackward } kind;
  int64_t micro_batch;
  bool operator==(const PipelineAction& o) const { return kind == o.kind && micro_batch == o.micro_batch; }
};

/// The actions of `stage` (0-based) in a pipeline of `stages` over `micro_batches`:
///   gpipe: all forwards, then all backwards (in micro-batch order);
///   1f1b:  warm-up W = min(stages - stage - 1, m) forwards, then alternate one forward and one
///          backward, then the W remaining backwards.
/// With one stage both are forward/backward per micro-batch: plain gradient accumulation.
std::vector<PipelineAction> pipeline_schedule(config::PipelineSchedule schedule, int64_t stages, int64_t stage,
                                              int64_t micro_batches);

/// "F0 F1 B0 F2 B1 B2" (for messages and tests).
std::string to_string(const std::vector<PipelineAction>& actions);

}  // namespace yuanmoe::parallel
