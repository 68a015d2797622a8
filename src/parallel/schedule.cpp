#include "yuanmoe/parallel/schedule.h"

#include <algorithm>
#include <stdexcept>

namespace yuanmoe::parallel {

std::vector<PipelineAction> pipeline_schedule(config::PipelineSchedule schedule, int64_t stages, int64_t stage,
                                              int64_t micro_batches) {
  if (stages < 1 || stage < 0 || stage >= stages || micro_batches < 1) {
    throw std::invalid_argument("pipeline_schedule: need 0 <= stage < stages and micro_batches >= 1");
  }
  std::vector<PipelineAction> actions;
  const auto forward = [&](int64_t i) { actions.push_back({PipelineAction::kForward, i}); };
  const auto backward = [&](int64_t i) { actions.push_back({PipelineAction::kBackward, i}); };
  if (schedule == config::PipelineSchedule::kGPipe && stages > 1) {
    for (int64_t i = 0; i < micro_batches; ++i) forward(i);
    for (int64_t i = 0; i < micro_batches; ++i) backward(i);
    return actions;
  }
  const int64_t warmup = std::min(stages - stage - 1, micro_batches);
  for (int64_t i = 0; i < warmup; ++i) forward(i);
  for (int64_t i = 0; i < micro_batches - warmup; ++i) {
    forward(warmup + i);
    backward(i);
  }
  for (int64_t i = micro_batches - warmup; i < micro_batches; ++i) backward(i);
  return actions;
}

std::string to_string(const std::vector<PipelineAction>& actions) {
  std::string out;
  for (const auto& a : actions) {
    if (!out.empty()) out += ' ';
    out += (a.kind == PipelineAction::kForward ? 'F' : 'B') + std::to_string(a.micro_batch);
  }
  return out;
}

}  // namespace yuanmoe::parallel
