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

PipelineTiming simulate_pipeline(config::PipelineSchedule schedule, int64_t stages, int64_t micro_batches,
                                 double forward, double backward) {
  std::vector<std::vector<PipelineAction>> lists;
  for (int64_t s = 0; s < stages; ++s) lists.push_back(pipeline_schedule(schedule, stages, s, micro_batches));
  // done_forward[s][i] / done_backward[s][i]: finish time, < 0 while pending.
  std::vector<std::vector<double>> done_forward(stages, std::vector<double>(micro_batches, -1));
  std::vector<std::vector<double>> done_backward(stages, std::vector<double>(micro_batches, -1));
  std::vector<size_t> next(stages, 0);
  std::vector<double> clock(stages, 0.0);
  PipelineTiming timing;
  std::vector<int64_t> in_flight(stages, 0);
  double busy = 0.0;
  for (bool progressed = true; progressed;) {
    progressed = false;
    for (int64_t s = 0; s < stages; ++s) {
      while (next[s] < lists[s].size()) {
        const PipelineAction a = lists[s][next[s]];
        double ready;  // when the action's input is available, or < 0 if not yet
        if (a.kind == PipelineAction::kForward) {
          ready = s == 0 ? 0.0 : done_forward[s - 1][a.micro_batch];
        } else {
          if (done_forward[s][a.micro_batch] < 0) throw std::logic_error("backward before its forward");
          ready = s == stages - 1 ? done_forward[s][a.micro_batch] : done_backward[s + 1][a.micro_batch];
        }
        if (ready < 0) break;  // waits for another stage
        const double cost = a.kind == PipelineAction::kForward ? forward : backward;
        clock[s] = std::max(clock[s], ready) + cost;
        busy += cost;
        if (a.kind == PipelineAction::kForward) {
          done_forward[s][a.micro_batch] = clock[s];
          timing.max_in_flight = std::max(timing.max_in_flight, ++in_flight[s]);
        } else {
          done_backward[s][a.micro_batch] = clock[s];
          --in_flight[s];
        }
        ++next[s];
        progressed = true;
      }
    }
  }
  for (int64_t s = 0; s < stages; ++s) {
    if (next[s] != lists[s].size()) {
      throw std::logic_error("pipeline deadlock: stage " + std::to_string(s) + " stuck at action " +
                             std::to_string(next[s]) + " of " + to_string(lists[s]));
    }
  }
  timing.step_time = *std::max_element(clock.begin(), clock.end());
  timing.bubble_fraction = 1.0 - busy / (static_cast<double>(stages) * timing.step_time);
  return timing;
}

}  // namespace yuanmoe::parallel
