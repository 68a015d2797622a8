// Runs a test body on several ranks of real Gloo process groups, one thread each, connected
// through a TCPStore on loopback: the same c10d code as separate processes, without a launch.
#pragma once

#include <cstdlib>
#include <exception>
#include <functional>
#include <thread>
#include <unistd.h>
#include <vector>

#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/parallel/world.h"

namespace yuanmoe::testing {

// c10d's flight recorder is one per process, and its record() adds a process group's first entry
// to a std::map before taking its mutex (torch/csrc/distributed/c10d/FlightRecorderDetail.hpp in
// libtorch 2.11): ranks as threads, whose groups start their first collectives at the same time,
// race on that map and crash about one run in fifteen. Separate processes (every real launch) do
// not share it. A buffer of 0 entries turns it off; it reads the variable once, when first used,
// so this is set before main.
inline const bool kFlightRecorderOff = ::setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/1) == 0;

/// body(context) on `world_size` threads (world = pipeline_stages x dp, parallel.expert =
/// `expert`); rethrows the first failure.
inline void on_ranks(int64_t world_size, int64_t pipeline_stages,
                     const std::function<void(parallel::ParallelContext&)>& body, int64_t expert = 1) {
  // From the kernel: ports derived from the process id collided between tests that ctest -j
  // runs side by side (EADDRINUSE at the store).
  const int64_t port = parallel::free_loopback_port();
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_size));
  std::vector<std::thread> threads;
  for (int64_t rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        parallel::WorldInfo world;
        world.rank = rank;
        world.world_size = world_size;
        world.master_port = port;
        world.launcher = "torchrun";
        config::ParallelConfig options;
        options.pipeline_parallel_size = pipeline_stages;
        options.expert = expert;
        options.timeout_s = 60;
        parallel::ParallelContext context =
            parallel::ParallelContext::connect(world, pipeline_stages, options, torch::kCPU);
        body(context);
        context.world_group.barrier();
      } catch (...) {
        errors[static_cast<size_t>(rank)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace yuanmoe::testing
