// The process groups of a data x pipeline parallel run over c10d (docs/parallelism.md):
// Gloo on CPU tensors, NCCL on CUDA tensors, rendezvous through a TCPStore. A group of one
// process is a no-op object, so a single-process run takes exactly the same code path.
//
// Layout (Megatron's order, data parallel inner): global rank = stage * dp + dp_rank.
//   dp group of stage s:        ranks {s*dp + d : d < dp}   (gradient all-reduce)
//   pp group of dp rank d:      ranks {s*dp + d : s < pp}   (activations; group rank = stage)
//   embedding group of d:       first and last stage of that pipeline (tied-embedding gradient)
//   ep group (expert parallel): ep consecutive dp ranks of a stage, {s*dp + b*ep + i : i < ep}
//                               (tokens to their experts and back: all-to-all)
//   edp group (expert data parallel): the dp ranks of a stage holding the same experts,
//                               {s*dp + j*ep + i : j < dp/ep} (expert-gradient reduction)
//   world:                      everything (metrics, expert load, failures)
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/parallel/world.h"

namespace yuanmoe::parallel {

/// A send or collective in flight: wait() before its tensors are read or changed (and before the
/// step ends). It keeps them alive until then.
class Pending {
 public:
  Pending() = default;
  explicit Pending(std::function<void()> wait) : wait_(std::move(wait)) {}
  void wait() {
    if (wait_) wait_();
    wait_ = nullptr;
  }

 private:
  std::function<void()> wait_;
};

class Group {
 public:
  Group() = default;  // this process alone, no process group: every collective is the identity
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  /// Whether a c10d process group stands behind it (also one of a single rank, GroupsOfOne::kBuild).
  bool connected() const { return impl_ != nullptr; }

  /// Element-wise sum over the group, in place (one tensor, or a list of one dtype/device).
  void all_reduce_sum(Tensor& tensor) const;
  void broadcast(Tensor& tensor, int64_t root) const;
  /// rows [N, ...]: the first send_rows[0] rows to group rank 0, the next send_rows[1] to rank 1,
  /// ...; returns what arrived, recv_rows[r] rows from rank r, in rank order. Not differentiable
  /// (parallel/expert_parallel.h wraps it for autograd).
  Tensor all_to_all(const Tensor& rows, const std::vector<int64_t>& send_rows,
                    const std::vector<int64_t>& recv_rows) const;
  /// input [size() * n] summed over the group; this rank keeps block rank() of the sum: [n].
  Tensor reduce_scatter_sum(const Tensor& input) const;
  /// The two above started and not waited for (the gradient buckets overlap them with backward):
  /// `tensor` holds the sum, and `output` (set here: [n], or `input` itself in a group of one)
  /// this rank's block, once wait() returned. Gloo and NCCL run them in the order they started.
  Pending start_all_reduce_sum(const Tensor& tensor) const;
  Pending start_reduce_scatter_sum(const Tensor& input, Tensor& output) const;
  /// shard [n] from every rank -> [size() * n], block r from rank r.
  Tensor all_gather(const Tensor& shard) const;
  void barrier() const;
  /// Point to point with group-local ranks. `tag` tells apart messages between one pair (Gloo;
  /// NCCL matches by order, which the schedules keep identical on both ends).
  Pending send(const Tensor& tensor, int64_t peer, int tag) const;
  void recv(Tensor& tensor, int64_t peer, int tag) const;  // tensor: preallocated, contiguous

  struct Impl;  // the c10d process group (process_groups.cpp)
  Group(std::shared_ptr<Impl> impl, int64_t rank, int64_t size) : impl_(std::move(impl)), rank_(rank), size_(size) {}

 private:
  std::shared_ptr<Impl> impl_;
  int64_t rank_ = 0;
  int64_t size_ = 1;
};

struct ParallelLayout {
  int64_t dp = 1, pp = 1;
  int64_t dp_rank = 0, stage = 0;
  int64_t ep = 1, ep_rank = 0;  // expert parallel: ep divides dp; ep_rank = dp_rank % ep
  bool first_stage() const { return stage == 0; }
  bool last_stage() const { return stage == pp - 1; }
};

/// What connect() does for a group that holds this rank alone: nothing (kSkip: the group is the
/// no-op Group(), and a world of one makes no rendezvous), or a real c10d process group of one
/// rank (kBuild: the collectives run through Gloo or NCCL, which a test of the backend on one
/// machine and one GPU needs).
enum class GroupsOfOne { kSkip, kBuild };

class ParallelContext {
 public:
  ParallelContext() = default;  // single process

  /// Rendezvous and build every group this rank belongs to; world.world_size must be a
  /// multiple of pipeline_stages and options.expert divide the data-parallel size. Throws
  /// naming the problem (store unreachable, timeout, ...). A world.master_port of 0 lets rank 0's
  /// store pick a free port (one process only: the others could not find it).
  static ParallelContext connect(const WorldInfo& world, int64_t pipeline_stages,
                                 const config::ParallelConfig& options, torch::Device device,
                                 GroupsOfOne groups_of_one = GroupsOfOne::kSkip);

  const WorldInfo& world() const { return world_; }
  const ParallelLayout& layout() const { return layout_; }
  bool distributed() const { return world_.world_size > 1; }

  Group world_group, dp, pp, embedding, ep, edp;

  /// Best effort: tell the other ranks why this one is failing (read by first_failure()).
  void report_failure(const std::string& message) const;
  /// The first failure another rank reported, as "rank N: message", if any.
  std::optional<std::string> first_failure() const;

 private:
  WorldInfo world_;
  ParallelLayout layout_;
  struct Rendezvous;
  std::shared_ptr<Rendezvous> rendezvous_;
};

}  // namespace yuanmoe::parallel
