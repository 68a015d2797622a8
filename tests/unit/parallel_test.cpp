// Pipeline schedules as action lists, their simulated bubble against the formula, world
// detection from launcher variables, the layer partition, and layout-independent init.
#include <map>

#include "support/fixtures.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/schedule.h"
#include "yuanmoe/parallel/world.h"
#include "yuanmoe/train/trainer.h"

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

std::map<std::string, std::string> g_env;
std::optional<std::string> fake_env(const std::string& name) {
  const auto it = g_env.find(name);
  return it == g_env.end() ? std::nullopt : std::optional<std::string>(it->second);
}

TEST(World, TorchrunSlurmOpenMpiAndSingle) {
  g_env = {};
  EXPECT_EQ(detect_world(fake_env).launcher, "single");
  EXPECT_EQ(detect_world(fake_env).world_size, 1);

  g_env = {{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29600"},
           {"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"TORCHELASTIC_RESTART_COUNT", "2"}};
  WorldInfo w = detect_world(fake_env);
  EXPECT_EQ(w.launcher, "torchrun");
  EXPECT_EQ(w.rank, 3);
  EXPECT_EQ(w.world_size, 4);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.master_addr, "node7");
  EXPECT_EQ(w.master_port, 29600);
  EXPECT_TRUE(w.agent_store);
  EXPECT_EQ(w.restart_count, 2);

  g_env = {{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
           {"SLURM_JOB_NODELIST", "gpu[003-005,010],cpu1"}};
  w = detect_world(fake_env);
  EXPECT_EQ(w.launcher, "slurm");
  EXPECT_EQ(w.rank, 5);
  EXPECT_EQ(w.world_size, 8);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.master_addr, "gpu003");

  g_env = {{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}};
  w = detect_world(fake_env);
  EXPECT_EQ(w.launcher, "openmpi");
  EXPECT_EQ(w.rank, 1);
  EXPECT_EQ(w.master_addr, "127.0.0.1");
}

TEST(World, BadValuesNameTheVariable) {
  const auto error = [](std::map<std::string, std::string> env) {
    g_env = std::move(env);
    try {
      detect_world(fake_env);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error({{"RANK", "x"}, {"WORLD_SIZE", "2"}}).find("RANK=x: expected an integer"), std::string::npos);
  EXPECT_NE(error({{"RANK", "2"}, {"WORLD_SIZE", "2"}}).find("rank 2 is not below the world size 2"), std::string::npos);
  EXPECT_NE(error({{"RANK", "0"}}).find("WORLD_SIZE is not set"), std::string::npos);
  EXPECT_NE(error({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_PORT", "70000"}}).find("not a port"), std::string::npos);
  EXPECT_EQ(first_slurm_host("node1,node2"), "node1");
  EXPECT_EQ(first_slurm_host("a[7]"), "a7");
}

TEST(Stages, BalancedPartitionCoversEveryLayerOnce) {
  for (int64_t layers : {1, 4, 7, 24}) {
    for (int64_t stages = 1; stages <= layers && stages <= 8; ++stages) {
      int64_t next = 0;
      for (int64_t s = 0; s < stages; ++s) {
        const model::StageSpec spec = model::balanced_stage(layers, stages, s);
        EXPECT_EQ(spec.first_layer, next);
        EXPECT_GE(spec.end_layer - spec.first_layer, layers / stages);
        EXPECT_LE(spec.end_layer - spec.first_layer, layers / stages + 1);
        EXPECT_EQ(spec.has_embedding, s == 0);
        EXPECT_EQ(spec.has_head, s == stages - 1);
        next = spec.end_layer;
      }
      EXPECT_EQ(next, layers);
    }
  }
}

TEST(Stages, FirstAndLastStageSizesCanBeSet) {
  const auto sizes = [](int64_t layers, int64_t stages, int64_t first, int64_t last) {
    std::string out;
    for (int64_t s = 0; s < stages; ++s) {
      const model::StageSpec spec = model::balanced_stage(layers, stages, s, first, last);
      out += std::to_string(spec.end_layer - spec.first_layer) + (s + 1 < stages ? " " : "");
    }
    return out;
  };
  EXPECT_EQ(sizes(4, 2, 0, 1), "3 1");  // the head's stage lighter
  EXPECT_EQ(sizes(24, 8, 2, 2), "2 4 4 3 3 3 3 2");
  EXPECT_EQ(sizes(7, 3, 0, 0), "3 2 2");
  EXPECT_EQ(sizes(7, 3, 1, 0), "1 3 3");
  EXPECT_EQ(sizes(5, 1, 0, 0), "5");
}

TEST(Stages, InitialWeightsDependOnNamesNotOnTheLayout) {
  auto model_config = testing::small_model_config();
  model_config.num_layers = 3;
  const auto moe_config = testing::small_moe_config();
  model::Transformer whole(model_config, moe_config);
  model::init_weights(*whole, model_config, 7);
  std::map<std::string, Tensor> reference;
  for (const auto& [name, t] : checkpoint::model_state(*whole)) reference[name] = t;
  for (int64_t s = 0; s < 2; ++s) {
    model::Transformer stage(model_config, moe_config, model::balanced_stage(3, 2, s));
    model::init_weights(*stage, model_config, 7);
    for (const auto& [name, t] : checkpoint::model_state(*stage)) {
      ASSERT_TRUE(reference.count(name)) << name;
      EXPECT_TRUE(torch::equal(t, reference[name])) << name;  // the last stage's tied copy too
    }
  }
  model::Transformer other_seed(model_config, moe_config);
  model::init_weights(*other_seed, model_config, 8);
  EXPECT_FALSE(torch::equal(other_seed->embed_tokens->weight, whole->embed_tokens->weight));
}

}  // namespace
}  // namespace yuanmoe::parallel
