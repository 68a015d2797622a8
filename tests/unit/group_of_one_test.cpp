// A world of one with real process groups (parallel::GroupsOfOne::kBuild): the project's c10d code
// builds them over a TCPStore, and every collective runs through the backend. Gloo on the CPU runs
// everywhere; NCCL on cuda:0 where a GPU is (a world of one otherwise never touches NCCL: its
// groups are no-ops). One rank's collectives are the identity, so each result is known exactly.
#include <gtest/gtest.h>

#include "support/fixtures.h"
#include "support/step_harness.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::parallel {
namespace {

using testing::max_abs_diff;

ParallelContext connect_alone(config::Backend backend, const torch::Device& device) {
  WorldInfo world;         // rank 0 of 1
  world.master_port = 0;   // rank 0's store picks a free port
  config::ParallelConfig options;
  options.backend = backend;
  options.timeout_s = 60;
  return ParallelContext::connect(world, 1, options, device, GroupsOfOne::kBuild);
}

/// Every collective the trainer uses, on `device`, through the dp group (the gradients' group).
void expect_identity_collectives(const ParallelContext& context, const torch::Device& device) {
  ASSERT_TRUE(context.dp.connected() && context.world_group.connected() && context.edp.connected());
  EXPECT_EQ(context.dp.size(), 1);
  const Group& group = context.dp;
  const auto options = torch::dtype(torch::kFloat).device(device);
  const Tensor values = torch::arange(1, 13, options);  // 1..12: a wrong element or order shows

  Tensor summed = values.clone();
  group.all_reduce_sum(summed);
  EXPECT_TRUE(torch::equal(summed.cpu(), values.cpu()));
  Tensor in_bf16 = values.to(torch::kBFloat16);
  group.all_reduce_sum(in_bf16);
  EXPECT_TRUE(torch::equal(in_bf16.cpu(), values.to(torch::kBFloat16).cpu()));
  Tensor broadcast = values.clone();
  group.broadcast(broadcast, 0);
  EXPECT_TRUE(torch::equal(broadcast.cpu(), values.cpu()));

  const Tensor rows_43 = values.view({4, 3});
  const Tensor exchanged = group.all_to_all(rows_43, {4}, {4});
  EXPECT_TRUE(exchanged.data_ptr() != rows_43.data_ptr());  // it went through the backend
  EXPECT_TRUE(torch::equal(exchanged.cpu(), rows_43.cpu()));
  const Tensor scattered = group.reduce_scatter_sum(values);
  EXPECT_TRUE(torch::equal(scattered.cpu(), values.cpu()));
  const Tensor gathered = group.all_gather(values.narrow(0, 0, 5));
  EXPECT_TRUE(torch::equal(gathered.cpu(), values.narrow(0, 0, 5).cpu()));
  group.barrier();

  Tensor host_sums = torch::tensor({1.5, 2.5}, torch::kDouble);  // the world group: Gloo, host tensors
  context.world_group.all_reduce_sum(host_sums);
  EXPECT_TRUE(torch::equal(host_sums, torch::tensor({1.5, 2.5}, torch::kDouble)));
}

/// Two steps of the trainer's step through `context` and through no groups at all: the same
/// weights and batches, so the same losses and weights (to `tolerance`; 0: bit for bit).
void expect_step_through_groups_equals_none(ParallelContext context, const torch::Device& device,
                                            const config::RunConfig& run, double tolerance) {
  testing::StepHarness through(run, device, std::move(context));
  testing::StepHarness alone(run, device);
  for (int i = 0; i < 2; ++i) {
    const train::StepResult a = through.step(), b = alone.step();
    EXPECT_NEAR(a.loss, b.loss, tolerance * std::abs(b.loss)) << "step " << i + 1;
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e3 * tolerance * b.grad_norm) << "step " << i + 1;
  }
  const auto theirs = alone.model().named_parameters();
  for (const auto& item : through.model().named_parameters()) {
    EXPECT_LE(max_abs_diff(item.value(), theirs[item.key()]), 1e3 * tolerance) << item.key();
  }
}

config::RunConfig small_tiny_m32(const std::vector<std::string>& extra = {}) {
  std::vector<std::string> overrides{"train.seq_length=64"};
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  return config::load_config("configs/tiny-m32.json", overrides);
}

TEST(GroupOfOneTest, GlooCollectivesOnTheCpuAreTheIdentity) {
  expect_identity_collectives(connect_alone(config::Backend::kGloo, torch::kCPU), torch::kCPU);
}

// The gradients' data-parallel mean goes through the Gloo group of one (a real all-reduce, then
// / 1): bit for bit what a process without groups computes.
TEST(GroupOfOneTest, TrainStepThroughAGlooGroupOfOneEqualsNoGroups) {
  expect_step_through_groups_equals_none(connect_alone(config::Backend::kGloo, torch::kCPU), torch::kCPU,
                                         small_tiny_m32(), 0.0);
}

TEST(CudaNcclTest, NcclCollectivesOnCuda0AreTheIdentity) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const torch::Device gpu(torch::kCUDA, 0);
  expect_identity_collectives(connect_alone(config::Backend::kNccl, gpu), gpu);
}

// tiny-m32 in bf16 on cuda:0, its gradients reduced through the NCCL group of one. CUDA's
// backward kernels may sum in another order from run to run, so equality is to 1e-6 of the loss
// (1e-3 of the gradient norm, 1e-3 absolute on the weights: about ten steps of the lr).
TEST(CudaNcclTest, TrainStepThroughAnNcclGroupOfOneEqualsNoGroups) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const torch::Device gpu(torch::kCUDA, 0);
  expect_step_through_groups_equals_none(connect_alone(config::Backend::kNccl, gpu), gpu,
                                         small_tiny_m32({"train.precision=bf16"}), 1e-6);
}

}  // namespace
}  // namespace yuanmoe::parallel
