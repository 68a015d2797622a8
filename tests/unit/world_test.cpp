// World detection from the launchers' variables (torchrun, Slurm, Open MPI, one process), and a bad
// value named with its variable.
#include <map>

#include "support/fixtures.h"
#include "yuanmoe/parallel/world.h"

namespace yuanmoe::parallel {
namespace {

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

}  // namespace
}  // namespace yuanmoe::parallel
