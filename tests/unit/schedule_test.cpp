// Pipeline schedules as action lists, and their bubble, in an event-driven run of every stage's
// list, against the formula.
#include <algorithm>

#include "support/fixtures.h"
#include "yuanmoe/parallel/schedule.h"

namespace yuanmoe::parallel {
namespace {

using config::PipelineSchedule;

// An event-driven run of all stages' lists with forward time `forward` and backward time
// `backward` per micro-batch and stage, instant messages. Throws std::logic_error if the lists
// deadlock or break a dependency. Returns the makespan and the idle fraction of the stages.
struct PipelineTiming {
  double step_time = 0.0;
  double bubble_fraction = 0.0;      // 1 - busy / (stages * step_time)
  int64_t max_in_flight = 0;         // most micro-batches whose activations a stage holds at once
};

PipelineTiming simulate_pipeline(PipelineSchedule schedule, int64_t stages, int64_t micro_batches, double forward,
                                 double backward) {
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

TEST(PipelineSchedule, ListsForTwoStages) {
  EXPECT_EQ(to_string(pipeline_schedule(PipelineSchedule::k1F1B, 2, 0, 4)), "F0 F1 B0 F2 B1 F3 B2 B3");
  EXPECT_EQ(to_string(pipeline_schedule(PipelineSchedule::k1F1B, 2, 1, 4)), "F0 B0 F1 B1 F2 B2 F3 B3");
  EXPECT_EQ(to_string(pipeline_schedule(PipelineSchedule::kGPipe, 2, 0, 3)), "F0 F1 F2 B0 B1 B2");
  EXPECT_EQ(to_string(pipeline_schedule(PipelineSchedule::kGPipe, 2, 1, 3)), "F0 F1 F2 B0 B1 B2");
  // One stage: gradient accumulation, whatever the schedule.
  EXPECT_EQ(to_string(pipeline_schedule(PipelineSchedule::kGPipe, 1, 0, 3)), "F0 B0 F1 B1 F2 B2");
  // Fewer micro-batches than stages: warm-up is capped by m.
  EXPECT_EQ(to_string(pipeline_schedule(PipelineSchedule::k1F1B, 4, 0, 2)), "F0 F1 B0 B1");
  EXPECT_THROW(pipeline_schedule(PipelineSchedule::k1F1B, 2, 2, 4), std::invalid_argument);
}

TEST(PipelineSchedule, EveryListIsCompleteAndOrdered) {
  for (const auto schedule : {PipelineSchedule::k1F1B, PipelineSchedule::kGPipe}) {
    for (int64_t p = 1; p <= 5; ++p) {
      for (int64_t m = 1; m <= 9; ++m) {
        for (int64_t s = 0; s < p; ++s) {
          const auto actions = pipeline_schedule(schedule, p, s, m);
          ASSERT_EQ(actions.size(), static_cast<size_t>(2 * m));
          std::map<int64_t, int> forward_at, backward_at;
          for (size_t i = 0; i < actions.size(); ++i) {
            auto& slot = actions[i].kind == PipelineAction::kForward ? forward_at : backward_at;
            EXPECT_TRUE(slot.emplace(actions[i].micro_batch, static_cast<int>(i)).second);
          }
          for (int64_t i = 0; i < m; ++i) {
            ASSERT_TRUE(forward_at.count(i) && backward_at.count(i));
            EXPECT_LT(forward_at[i], backward_at[i]);
            if (i > 0) EXPECT_LT(forward_at[i - 1], forward_at[i]);  // micro-batches enter in order
          }
        }
      }
    }
  }
}

TEST(PipelineSchedule, SimulatedBubbleMatchesTheFormula) {
  // docs/parallelism.md: bubble / total = (p - 1) / (m + p - 1) for both schedules;
  // 1F1B keeps at most p - s micro-batches in flight on stage s, GPipe all m.
  for (const auto schedule : {PipelineSchedule::k1F1B, PipelineSchedule::kGPipe}) {
    for (int64_t p : {1, 2, 4}) {
      for (int64_t m : {1, 2, 4, 8, 16}) {
        const PipelineTiming t = simulate_pipeline(schedule, p, m, 1.0, 2.0);
        const double expected = static_cast<double>(p - 1) / static_cast<double>(m + p - 1);
        EXPECT_NEAR(t.bubble_fraction, expected, 1e-12) << "p " << p << " m " << m;
        EXPECT_DOUBLE_EQ(t.step_time, 3.0 * static_cast<double>(m + p - 1));
        EXPECT_EQ(t.max_in_flight, schedule == PipelineSchedule::kGPipe && p > 1 ? m : std::min(p, m));
      }
    }
  }
}

}  // namespace
}  // namespace yuanmoe::parallel
