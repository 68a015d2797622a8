// Work split over the intra-op threads with the calling thread's state.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace yuanmoe {

/// at::parallel_for(begin, end, grain, fn), with the caller's thread-local state (grad mode,
/// dispatch keys, the profiler's callbacks) installed on every worker. at::launch and the
/// autograd engine carry that state to their threads; at::parallel_for over OpenMP does not, so
/// without this a worker would run with grad mode on and a profile would hold none of its
/// operators.
template <typename Fn>
void parallel_for_with_caller_state(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard guard(state);
    fn(first, last);
  });
}

}  // namespace yuanmoe
