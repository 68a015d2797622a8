// Pipeline schedules as action lists, and their simulated bubble against the formula.
#include "support/fixtures.h"
#include "yuanmoe/parallel/schedule.h"

namespace yuanmoe::parallel {
namespace {

using config::PipelineSchedule;

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
