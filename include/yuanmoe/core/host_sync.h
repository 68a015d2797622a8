// Where the host waits for the device. On CUDA a training step only queues work: the host runs
// ahead, and the GPU never idles while the host prepares the next kernel. A read of a device value
// (.item(), a blocking copy to the host, nonzero, masked_select) or a blocking copy from pageable
// host memory makes the host wait until the queue drains. The step makes one such wait on
// purpose, to read its figures (losses, gradient norm, routing counts: train/step.cpp); an
// ExpectedHostSync scope marks it.
//
// Two tests hold the step to that (tests/unit/host_sync_test.cpp): on CUDA it runs under the
// sync debug mode set to error (torch.cuda.set_sync_debug_mode("error")), which the scope lifts
// while it lives; on the CPU an operator observer fails any operator that would wait for a CUDA
// device (`_local_scalar_dense`, `nonzero`, ...) outside the scope.
#pragma once

namespace yuanmoe {

class ExpectedHostSync {
 public:
  ExpectedHostSync();
  ~ExpectedHostSync();
  ExpectedHostSync(const ExpectedHostSync&) = delete;
  ExpectedHostSync& operator=(const ExpectedHostSync&) = delete;

  /// True while a scope is alive on this thread.
  static bool active();

 private:
  int previous_mode_ = 0;  // c10::cuda::SyncDebugMode before the outermost scope
};

}  // namespace yuanmoe
