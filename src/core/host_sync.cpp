#include "yuanmoe/core/host_sync.h"

#include <c10/cuda/CUDAFunctions.h>

namespace yuanmoe {

namespace {
thread_local int depth = 0;
}  // namespace

ExpectedHostSync::ExpectedHostSync() {
  if (depth++ > 0) return;
  // The mode is process-wide; only the outermost scope saves and restores it.
  auto& state = c10::cuda::warning_state();
  previous_mode_ = static_cast<int>(state.get_sync_debug_mode());
  state.set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
}

ExpectedHostSync::~ExpectedHostSync() {
  if (--depth > 0) return;
  c10::cuda::warning_state().set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(previous_mode_));
}

bool ExpectedHostSync::active() { return depth > 0; }

}  // namespace yuanmoe
