// Who this process is in a multi-process run (docs/parallelism.md). Resolution
// order: torchrun-style RANK/WORLD_SIZE, then Slurm, then Open MPI, else a single process.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace yuanmoe::parallel {

struct WorldInfo {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;  // selects the GPU on CUDA machines
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  std::string launcher = "single";  // "torchrun" (or `yuanmoe launch`), "slurm", "openmpi", "single"
  // torchrun's agent already serves the TCPStore; every rank connects as a client under
  // /worker/attempt_<restart_count> (torchrun's layout, docs/parallelism.md).
  bool agent_store = false;
  int64_t restart_count = 0;
};

/// Reads variables through `getenv` (a parameter so tests need not touch the environment).
/// Malformed or inconsistent values throw std::invalid_argument naming the variable.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
WorldInfo detect_world(const EnvLookup& getenv);

/// The process environment.
WorldInfo detect_world();

/// A loopback port no socket holds right now, from the kernel (bind to port 0, read it back), for
/// a master that starts its store soon after: `yuanmoe launch`, and tests that run ranks as
/// threads side by side under ctest -j. Throws std::runtime_error when no socket can be bound.
int64_t free_loopback_port();

/// The first host of a Slurm node list: "gpu[003-005,010],cpu1" -> "gpu003".
std::string first_slurm_host(const std::string& node_list);

}  // namespace yuanmoe::parallel
