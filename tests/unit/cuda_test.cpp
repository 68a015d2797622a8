// The CUDA path against the CPU. Built on every machine (the binary is one for CPU and GPU);
// each test skips, saying why, where torch::cuda::is_available() is false.
#include <c10/cuda/CUDAFunctions.h>
#include <gtest/gtest.h>

#include "support/fixtures.h"
#include "support/temp_dir.h"
#include "support/tiny_run.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/train/adamw.h"
#include "yuanmoe/train/precision.h"
#include "yuanmoe/train/trainer.h"

namespace yuanmoe::model {
namespace {

using testing::max_abs_diff;

class CudaTest : public testing::SeededTest {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
    testing::SeededTest::SetUp();
  }
};

// The same weights and tokens in fp64 on both devices: logits and every parameter's gradient
// agree to rounding (the MoE's dispatch, the router's top-k and the GEMMs run CUDA kernels).
TEST_F(CudaTest, ForwardAndBackwardOnCudaEqualCpuInDouble) {
  const auto model_config = testing::small_model_config();
  Transformer cpu(model_config, testing::small_moe_config());
  init_weights(*cpu, model_config, 3);
  cpu->to(torch::kDouble);
  Transformer gpu(model_config, testing::small_moe_config());
  gpu->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  for (const auto& item : cpu->named_parameters()) gpu->named_parameters()[item.key()].copy_(item.value());
  gpu->to(torch::Device(torch::kCUDA, 0));

  const auto ids = torch::randint(0, model_config.vocab_size, {2, 16}, torch::kLong);
  const auto positions = default_position_ids(2, 16);
  torch::AutoGradMode grad(true);
  const auto cpu_logits = cpu(ids, positions).out;
  const auto gpu_logits = gpu(ids.cuda(), positions.cuda()).out;
  EXPECT_LT(max_abs_diff(gpu_logits.cpu(), cpu_logits), 1e-10);
  cpu_logits.square().sum().backward();
  gpu_logits.square().sum().backward();
  for (const auto& item : cpu->named_parameters()) {
    EXPECT_LT(max_abs_diff(gpu->named_parameters()[item.key()].grad().cpu(), item.value().grad()), 1e-9)
        << item.key();
  }
}

// Yuan 2.0-M32's head_dim 256 in bf16 through SDPA's fused CUDA kernels against fp32
// materialised attention: within bf16 rounding.
TEST_F(CudaTest, SdpaAtHeadDim256InBf16MatchesMaterialisedFp32) {
  const auto options = torch::TensorOptions().device(torch::kCUDA, 0);
  const auto q = torch::randn({1, 4, 300, 256}, options), k = torch::randn({1, 4, 300, 256}, options);
  const auto v = torch::randn({1, 4, 300, 256}, options);
  const auto out = sdpa_causal_attention(q.to(torch::kBFloat16), k.to(torch::kBFloat16), v.to(torch::kBFloat16));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  EXPECT_LT(max_abs_diff(out.to(torch::kFloat), causal_attention(q, k, v, 0.0)), 3e-2);
}

TEST_F(CudaTest, TrainingDeviceIsTheLocalRanksGpu) {
  EXPECT_EQ(train::training_device(0), torch::Device(torch::kCUDA, 0));
  const auto gpus = static_cast<int64_t>(torch::cuda::device_count());
  EXPECT_THROW(train::training_device(gpus), std::runtime_error);
}

// A dropless top-k MoE layer in bf16 on CUDA takes the at::_grouped_mm path (moe.expert_gemm =
// auto) and, forward and backward, never waits for the device: with CUDA's sync debug mode set to
// error, any .item(), host copy or other synchronising call inside it throws.
TEST_F(CudaTest, GroupedMmMoeLayerNeverSynchronisesWithTheHost) {
  const torch::Device device(torch::kCUDA, 0);
  Moe moe(testing::small_moe_config(), 64);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : moe->parameters()) p.normal_(0.0, 0.3);
  }
  moe->to(device, torch::kBFloat16);
  const Tensor x = torch::randn({256, 64}, torch::dtype(torch::kBFloat16).device(device)).requires_grad_(true);
  const Tensor d_out = torch::randn_like(x);
  ASSERT_TRUE(moe->experts->uses_grouped_mm(x));
  torch::cuda::synchronize();
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  std::string error;
  try {
    moe(x).out.backward(d_out);
  } catch (const std::exception& e) {
    error = e.what();
  }
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  EXPECT_TRUE(error.empty()) << error.substr(0, error.find('\n'));
  EXPECT_TRUE(moe->experts->w1.grad().defined());
}

// A world of one with parallel.backend = nccl: the trainer takes the same code path as on many
// GPUs (its groups of one are no-ops), trains on cuda:0 in bf16 and learns; the checkpoint holds
// this GPU's generator beside the CPU one.
TEST_F(CudaTest, TrainsInBf16OnAnNcclWorldOfOne) {
  testing::TempDir data, run_dir;
  testing::write_tiny_corpora(data.path().string(), 97);
  config::RunConfig run = testing::tiny_run_config(data.path().string());
  run.parallel.backend = config::Backend::kNccl;
  run.train.precision = config::Precision::kBf16;
  run.train.max_steps = 20;
  train::Trainer trainer(run, {run_dir.path()});
  const train::TrainSummary summary = trainer.run();
  EXPECT_TRUE(trainer.model()->parameters().front().is_cuda());
  ASSERT_TRUE(summary.first_eval && summary.last_eval);
  EXPECT_LT(summary.last_eval->loss, summary.first_eval->loss);
  const auto saved = checkpoint::load_checkpoint(summary.last_checkpoint);
  std::set<std::string> rng;
  for (const auto& [name, state] : saved.rng) rng.insert(name);
  EXPECT_EQ(rng, (std::set<std::string>{"rank0/cpu", "rank0/cuda"}));
}

// The fused AdamW's CUDA kernel against its CPU kernel: the same parameters and gradients in
// fp64 over 10 steps, a matrix (decayed) and a vector (not), the step counts kept on the GPU.
TEST_F(CudaTest, FusedAdamWOnCudaEqualsCpuInDouble) {
  config::TrainConfig train;
  train.lr = 1e-2;
  std::vector<Tensor> on_cpu{torch::randn({16, 24}, torch::kDouble), torch::randn({24}, torch::kDouble)};
  std::vector<Tensor> on_cuda;
  for (const Tensor& p : on_cpu) on_cuda.push_back(p.to(torch::kCUDA));
  train::AdamW cpu(on_cpu, {0.1, 0.0}, train), cuda(on_cuda, {0.1, 0.0}, train);
  for (int step = 0; step < 10; ++step) {
    for (size_t i = 0; i < on_cpu.size(); ++i) {
      on_cpu[i].mutable_grad() = torch::randn_like(on_cpu[i]);
      on_cuda[i].mutable_grad() = on_cpu[i].grad().to(torch::kCUDA);
    }
    cpu.step();
    cuda.step();
  }
  for (size_t i = 0; i < on_cpu.size(); ++i) {
    EXPECT_TRUE(cuda.state(i)->step.is_cuda());
    EXPECT_LT(max_abs_diff(on_cuda[i].cpu(), on_cpu[i]), 1e-12) << i;
  }
}

}  // namespace
}  // namespace yuanmoe::model
