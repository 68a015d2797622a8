// Memory per rank (parallel/memory_plan.h): the per-stage counts against instantiated pipeline
// stages, the optimizer-state sharding, and the layout rules.
#include <gtest/gtest.h>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/model/param_count.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/memory_plan.h"

namespace yuanmoe::parallel {
namespace {

config::RunConfig tiny(std::vector<std::string> overrides = {}) {
  return config::load_config("configs/tiny-m32.json", overrides);
}

/// numel of an instantiated stage: experts = the named parameters containing ".experts.".
model::ParameterCounts instantiated_stage(const config::RunConfig& run, int64_t stage) {
  const config::ParallelConfig& p = run.parallel;
  model::Transformer t(run.model, run.moe,
                       model::balanced_stage(run.model.num_layers, p.pipeline_parallel_size, stage,
                                             p.first_stage_layers, p.last_stage_layers));
  model::ParameterCounts counts;
  for (const auto& item : t->named_parameters()) {
    const bool expert = item.key().find(".experts.") != std::string::npos;
    (expert ? counts.expert : counts.non_expert) += item.value().numel();
  }
  return counts;
}

struct StageCase {
  const char* name;
  int64_t pp;
  int64_t ep;
  std::vector<std::string> overrides;
};

void PrintTo(const StageCase& c, std::ostream* os) { *os << c.name; }

class MemoryPlanStageTest : public ::testing::TestWithParam<StageCase> {};

TEST_P(MemoryPlanStageTest, CountsEqualInstantiatedStages) {
  const StageCase c = GetParam();
  std::vector<std::string> overrides = c.overrides;
  overrides.push_back("parallel.pipeline_parallel_size=" + std::to_string(c.pp));
  overrides.push_back("parallel.expert=" + std::to_string(c.ep));
  const config::RunConfig run = tiny(overrides);
  const MemoryPlan plan = memory_plan(run, c.pp * c.ep);  // dp = ep
  ASSERT_EQ(plan.stages.size(), static_cast<size_t>(c.pp));
  for (int64_t s = 0; s < c.pp; ++s) {
    SCOPED_TRACE("stage " + std::to_string(s));
    const model::ParameterCounts expected = instantiated_stage(run, s);
    const StageMemory& m = plan.stages[static_cast<size_t>(s)];
    ASSERT_GT(expected.expert, 0);
    EXPECT_EQ(m.non_expert_parameters, expected.non_expert);
    EXPECT_EQ(m.expert_parameters, expected.expert / c.ep);  // E / ep experts per rank
    const int64_t held = m.non_expert_parameters + m.expert_parameters;
    EXPECT_EQ(m.parameter_bytes, 4 * held);
    EXPECT_EQ(m.gradient_bytes, 4 * held);
    EXPECT_EQ(m.optimizer_bytes, 8 * held);  // not sharded
  }
}

INSTANTIATE_TEST_SUITE_P(
    TinyM32, MemoryPlanStageTest,
    ::testing::Values(StageCase{"pp1", 1, 1, {}}, StageCase{"pp2", 2, 1, {}}, StageCase{"pp1_ep2", 1, 2, {}},
                      StageCase{"pp2_ep2", 2, 2, {}},
                      StageCase{"pp2_untied_3_plus_1", 2, 1,
                                {"model.tie_embeddings=false", "parallel.last_stage_layers=1"}},
                      StageCase{"pp2_every_other_layer_moe", 2, 2, {"moe.moe_layer_freq=2"}}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(MemoryPlanTest, ExpertParallelHalvesTheExpertPart) {
  const StageMemory one = memory_plan(tiny(), 2).stages[0];
  const StageMemory two = memory_plan(tiny({"parallel.expert=2"}), 2).stages[0];
  EXPECT_EQ(two.non_expert_parameters, one.non_expert_parameters);
  EXPECT_EQ(2 * two.expert_parameters, one.expert_parameters);
}

TEST(MemoryPlanTest, TiedLastStageHoldsTheEmbeddingCopyAndIsTheWorst) {
  const config::RunConfig run = tiny({"parallel.pipeline_parallel_size=2"});
  const MemoryPlan plan = memory_plan(run, 2);
  const int64_t embedding = run.model.vocab_size * run.model.hidden_size;
  // 2 + 2 layers: the last stage has the first's embedding (its copy) plus the final norm.
  EXPECT_EQ(plan.stages[1].non_expert_parameters - plan.stages[0].non_expert_parameters, run.model.hidden_size);
  EXPECT_GT(plan.stages[1].non_expert_parameters, embedding);
  EXPECT_EQ(plan.worst_stage, 1);
}

TEST(MemoryPlanTest, ShardedOptimizerStateIsHalfAtTwoDataParallelRanks) {
  const StageMemory whole = memory_plan(tiny(), 2).stages[0];
  const StageMemory sharded = memory_plan(tiny({"parallel.shard_optimizer=true"}), 2).stages[0];
  EXPECT_EQ(sharded.parameter_bytes, whole.parameter_bytes);  // only the state is sharded
  EXPECT_EQ(sharded.gradient_bytes, whole.gradient_bytes);
  // Two flat buffers (non-expert, expert) each padded to a multiple of 2: at most one element each.
  const int64_t padding = 2 * sharded.optimizer_bytes - whole.optimizer_bytes;
  EXPECT_GE(padding, 0);
  EXPECT_LE(padding, 2 * kOptimizerStateBytes);
  EXPECT_EQ(sharded.optimizer_bytes, 8 * ((whole.non_expert_parameters + 1) / 2 + (whole.expert_parameters + 1) / 2));
}

TEST(MemoryPlanTest, ShardingPadsToTheGroupSize) {
  // dp 3: the non-expert buffer over 3 ranks; ep 1, so the experts' over edp 3 as well.
  const StageMemory m = memory_plan(tiny({"parallel.shard_optimizer=true"}), 3).stages[0];
  const auto ceil3 = [](int64_t n) { return (n + 2) / 3; };
  EXPECT_EQ(m.optimizer_bytes, 8 * (ceil3(m.non_expert_parameters) + ceil3(m.expert_parameters)));
}

TEST(MemoryPlanTest, ExpertStateIsShardedOverTheExpertDataParallelGroup) {
  // dp 4, ep 2: non-expert state over 4 ranks, each rank's 16 experts' state over edp 2.
  const MemoryPlan plan = memory_plan(tiny({"parallel.expert=2", "parallel.shard_optimizer=true"}), 4);
  EXPECT_EQ(plan.groups.data, 4);
  EXPECT_EQ(plan.groups.expert_data, 2);
  const StageMemory& m = plan.stages[0];
  EXPECT_EQ(m.optimizer_bytes, 8 * ((m.non_expert_parameters + 3) / 4 + (m.expert_parameters + 1) / 2));
  // At ep = dp the experts' state has no one to share with: edp 1, held whole.
  const StageMemory edp1 = memory_plan(tiny({"parallel.expert=2", "parallel.shard_optimizer=true"}), 2).stages[0];
  EXPECT_EQ(edp1.optimizer_bytes, 8 * ((edp1.non_expert_parameters + 1) / 2 + edp1.expert_parameters));
}

TEST(MemoryPlanTest, Yuan2M32StagesAddUpToTheModelPlusTheTiedCopy) {
  const config::RunConfig run = config::load_config(
      "configs/yuan2-m32.json", {"parallel.pipeline_parallel_size=2", "parallel.expert=8"});
  const MemoryPlan plan = memory_plan(run, 16);
  int64_t all = 0;
  for (const StageMemory& m : plan.stages) all += m.non_expert_parameters + m.expert_parameters * 8;
  const int64_t total = model::model_size(run.model, run.moe, run.train.seq_length).total_parameters;
  EXPECT_EQ(all, total + run.model.vocab_size * run.model.hidden_size);
}

std::vector<std::string> issue_lines(const std::vector<config::ConfigIssue>& issues) {
  std::vector<std::string> lines;
  for (const auto& issue : issues) lines.push_back(issue.to_string());
  return lines;
}

TEST(MemoryPlanTest, WorldNotDivisibleByStages) {
  const auto issues = layout_issues(tiny({"parallel.pipeline_parallel_size=2"}), 3);
  ASSERT_EQ(issues.size(), 1u) << ::testing::PrintToString(issue_lines(issues));
  EXPECT_EQ(issues[0].path, "parallel.pipeline_parallel_size");
  EXPECT_EQ(issues[0].message, "is 2, which does not divide the world size (3)");
}

TEST(MemoryPlanTest, ExpertParallelNotDividingDataParallel) {
  const auto issues = layout_issues(tiny({"parallel.expert=4"}), 2);
  ASSERT_EQ(issues.size(), 1u) << ::testing::PrintToString(issue_lines(issues));
  EXPECT_EQ(issues[0].path, "parallel.expert");
  EXPECT_NE(issues[0].message.find("does not divide the data-parallel size (2"), std::string::npos)
      << issues[0].message;
  EXPECT_TRUE(layout_issues(tiny({"parallel.expert=4"}), 4).empty());
  EXPECT_FALSE(layout_issues(tiny(), 0).empty());
}

TEST(MemoryPlanTest, EveryLayoutProblemAtOnce) {
  // ep 3 divides neither the 32 experts (validate) nor dp 4 (the layout).
  const config::ParseResult checked = config::check_config("configs/tiny-m32.json", {"parallel.expert=3"});
  ASSERT_EQ(checked.issues.size(), 1u) << ::testing::PrintToString(issue_lines(checked.issues));
  EXPECT_NE(checked.issues[0].message.find("does not divide moe.num_experts (32)"), std::string::npos);
  try {
    memory_plan(checked.config, 4);
    FAIL() << "expected ConfigError";
  } catch (const config::ConfigError& e) {
    const auto lines = issue_lines(e.issues());
    ASSERT_EQ(lines.size(), 2u) << ::testing::PrintToString(lines);
    EXPECT_NE(lines[0].find("moe.num_experts"), std::string::npos) << lines[0];
    EXPECT_NE(lines[1].find("data-parallel size (4"), std::string::npos) << lines[1];
  }
}

}  // namespace
}  // namespace yuanmoe::parallel
