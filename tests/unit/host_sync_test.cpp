// The training step queues its work on the device and waits for it once, to read its figures
// (core/host_sync.h). On the CPU an operator observer stands in for CUDA's sync debug mode: it
// fails every operator that would make the host wait for a CUDA device outside an
// ExpectedHostSync scope. On a GPU the step runs under the sync debug mode itself.
#include <ATen/record_function.h>
#include <c10/cuda/CUDAFunctions.h>
#include <gtest/gtest.h>

#include <mutex>
#include <set>
#include <string>

#include "support/step_harness.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/core/host_sync.h"

namespace yuanmoe::train {
namespace {

/// Operators that, on CUDA tensors, read a value back to the host (and so wait for the device):
/// .item() and every bool conversion, and the ops whose output size depends on the data.
const std::set<std::string>& waiting_operators() {
  static const std::set<std::string> names{"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal",
                                           "aten::nonzero",             "aten::masked_select", "aten::argwhere",
                                           "aten::_unique2",            "aten::unique_dim",  "aten::unique_consecutive",
                                           "aten::bincount"};
  return names;
}

/// Operators whose CPU kernel reads values on the host where their CUDA kernel reads them on the
/// device: `_grouped_mm`'s CPU fallback loops over the experts' offsets (on CUDA the step runs it
/// in bf16, where the sm_90 kernel reads them on the device), and `_fused_adamw_`'s CPU kernel
/// reads each step count (the CUDA kernel takes the counts' device pointers).
bool reads_on_device_under_cuda(const std::string& name) {
  return name == "aten::_grouped_mm" || name == "aten::_fused_adamw_";
}

/// Records, while alive, every waiting operator called outside an ExpectedHostSync scope, reads
/// inside the operators above left out.
class WaitRecorder {
 public:
  WaitRecorder() {
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
              const std::string name = fn.name();
              if (reads_on_device_under_cuda(name)) ++exempt_depth();
              if (exempt_depth() == 0 && !ExpectedHostSync::active() && waiting_operators().count(name)) {
                std::lock_guard<std::mutex> lock(mutex());
                seen().insert(name);
              }
              return nullptr;
            },
            [](const at::RecordFunction& fn, at::ObserverContext*) {
              if (reads_on_device_under_cuda(fn.name())) --exempt_depth();
            })
            .scopes({at::RecordScope::FUNCTION}));
  }
  ~WaitRecorder() { at::removeCallback(handle_); }
  std::set<std::string> take() {
    std::lock_guard<std::mutex> lock(mutex());
    return std::exchange(seen(), {});
  }

 private:
  static int& exempt_depth() {
    thread_local int depth = 0;
    return depth;
  }
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::set<std::string>& seen() {
    static std::set<std::string> s;
    return s;
  }
  at::CallbackHandle handle_;
};

std::string joined(const std::set<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// The recorder sees a read of a value outside a scope and ignores it inside one.
TEST(HostSyncTest, RecorderSeesReadsOutsideTheScopeOnly) {
  WaitRecorder recorder;
  const Tensor x = torch::ones({3});
  (void)x.sum().item<double>();
  EXPECT_EQ(recorder.take(), (std::set<std::string>{"aten::_local_scalar_dense"}));
  {
    ExpectedHostSync read;
    (void)x.sum().item<double>();
    (void)torch::nonzero(x);
  }
  EXPECT_TRUE(recorder.take().empty());
}

// tiny-m32 through the trainer's step with the experts on _grouped_mm (the GPU's path): two
// steps, forward, backward, clip, AdamW and the routers' updates, call no waiting operator
// outside the step's one read of its figures. Attention router with the aux loss, and a linear
// router with the aux-loss-free bias (whose update moves counts back to the device).
class HostSyncStepTest : public ::testing::TestWithParam<std::vector<std::string>> {};

TEST_P(HostSyncStepTest, TrainStepWaitsOnlyToReadItsFigures) {
  std::vector<std::string> overrides{"train.seq_length=64", "moe.expert_gemm=grouped_mm"};
  for (const auto& o : GetParam()) overrides.push_back(o);
  const config::RunConfig run = config::load_config("configs/tiny-m32.json", overrides);
  testing::StepHarness harness(run, torch::kCPU);
  WaitRecorder recorder;
  for (int i = 0; i < 2; ++i) {
    const StepResult result = harness.step();
    EXPECT_TRUE(std::isfinite(result.loss) && result.grad_norm > 0);
  }
  const std::set<std::string> waits = recorder.take();
  EXPECT_TRUE(waits.empty()) << "operators that wait for a CUDA device, outside the figures' read: " << joined(waits);
}

INSTANTIATE_TEST_SUITE_P(Routers, HostSyncStepTest,
                         ::testing::Values(std::vector<std::string>{},
                                           std::vector<std::string>{"moe.router=linear", "moe.aux_loss_coeff=0",
                                                                    "moe.bias_balancing_rate=0.001"}));

// The same on cuda:0 in bf16 (the _grouped_mm bf16 kernels, SDPA, AdamW) under CUDA's sync
// debug mode set to error: a synchronising call outside the figures' read throws.
TEST(CudaHostSyncTest, TrainStepWaitsOnlyToReadItsFigures) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const config::RunConfig run = config::load_config("configs/tiny-m32.json", {"train.precision=bf16"});
  testing::StepHarness harness(run, torch::Device(torch::kCUDA, 0));
  torch::cuda::synchronize();
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  std::string error;
  std::vector<StepResult> results;
  try {
    for (int i = 0; i < 2; ++i) results.push_back(harness.step());
  } catch (const std::exception& e) {
    error = e.what();
  }
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  EXPECT_TRUE(error.empty()) << "step " << results.size() + 1 << ": " << error.substr(0, error.find('\n'));
  for (const StepResult& r : results) EXPECT_TRUE(std::isfinite(r.loss) && r.grad_norm > 0);
}

}  // namespace
}  // namespace yuanmoe::train
