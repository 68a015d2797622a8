#include "yuanmoe/parallel/process_groups.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// The PyPI wheel compiles Gloo into libtorch_cpu but ships none of the gloo/ headers that
// ProcessGroupGloo.hpp includes; scripts/setup.sh installs Debian's (docs/cuda.md).
#if __has_include(<gloo/algorithm.h>)
#define YUANMOE_HAVE_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace yuanmoe::parallel {

struct Group::Impl {
  c10::intrusive_ptr<c10d::Backend> pg;
  std::string description;  // "ep group of ranks 0, 1": what a failure names
};

namespace {

/// Waits for a collective; a failure (a peer died, a timeout) names the operation and the group's
/// ranks, so the one line a surviving rank prints says whom it lost.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, const char* operation, const std::string& group) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(operation) + " over the " + group + " failed: " + e.what());
  }
}

}  // namespace

struct ParallelContext::Rendezvous {
  c10::intrusive_ptr<c10d::Store> store;
};

void Group::all_reduce_sum(Tensor& tensor) const { start_all_reduce_sum(tensor).wait(); }

Pending Group::start_all_reduce_sum(const Tensor& tensor) const {
  if (!impl_) return {};
  auto tensors = std::make_shared<std::vector<Tensor>>(std::vector<Tensor>{tensor});
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  c10::intrusive_ptr<c10d::Work> work = impl_->pg->allreduce(*tensors, options);
  return Pending([work, tensors, impl = impl_] { wait_for(work, "all-reduce", impl->description); });
}

void Group::broadcast(Tensor& tensor, int64_t root) const {
  if (!impl_) return;
  std::vector<Tensor> tensors{tensor};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  wait_for(impl_->pg->broadcast(tensors, options), "broadcast", impl_->description);
}

Tensor Group::all_to_all(const Tensor& rows, const std::vector<int64_t>& send_rows,
                         const std::vector<int64_t>& recv_rows) const {
  if (!impl_) return rows;
  TORCH_CHECK(static_cast<int64_t>(send_rows.size()) == size_ && static_cast<int64_t>(recv_rows.size()) == size_,
              "all_to_all: one split per rank");
  std::vector<int64_t> output_shape = rows.sizes().vec();
  output_shape[0] = 0;
  for (int64_t n : recv_rows) output_shape[0] += n;
  Tensor input = rows.contiguous();
  Tensor output = torch::empty(output_shape, rows.options());
  std::vector<int64_t> send = send_rows, recv = recv_rows;
  wait_for(impl_->pg->alltoall_base(output, input, recv, send), "all-to-all", impl_->description);
  return output;
}

Tensor Group::reduce_scatter_sum(const Tensor& input) const {
  Tensor output;
  start_reduce_scatter_sum(input, output).wait();
  return output;
}

Pending Group::start_reduce_scatter_sum(const Tensor& input, Tensor& output) const {
  if (!impl_) {
    output = input;
    return {};
  }
  TORCH_CHECK(input.dim() == 1 && input.numel() % size_ == 0, "reduce_scatter_sum: [size * n] input");
  Tensor in = input.contiguous();
  output = torch::empty({input.numel() / size_}, input.options());
  c10d::ReduceScatterOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  c10::intrusive_ptr<c10d::Work> work = impl_->pg->_reduce_scatter_base(output, in, options);
  return Pending([work, in, out = output, impl = impl_] { wait_for(work, "reduce-scatter", impl->description); });
}

Tensor Group::all_gather(const Tensor& shard) const {
  if (!impl_) return shard;
  Tensor in = shard.contiguous();
  std::vector<int64_t> shape = shard.sizes().vec();
  shape[0] *= size_;
  Tensor out = torch::empty(shape, shard.options());
  wait_for(impl_->pg->_allgather_base(out, in), "all-gather", impl_->description);
  return out;
}

void Group::barrier() const {
  if (!impl_) return;
  wait_for(impl_->pg->barrier(), "barrier", impl_->description);
}

Pending Group::send(const Tensor& tensor, int64_t peer, int tag) const {
  TORCH_CHECK(size_ > 1, "send in a group of one process");
  auto tensors = std::make_shared<std::vector<Tensor>>(std::vector<Tensor>{tensor.contiguous()});
  c10::intrusive_ptr<c10d::Work> work = impl_->pg->send(*tensors, static_cast<int>(peer), tag);
  // The tensor must outlive the transfer: the closure owns it until wait().
  return Pending([work, tensors, impl = impl_] { wait_for(work, "send", impl->description); });
}

void Group::recv(Tensor& tensor, int64_t peer, int tag) const {
  TORCH_CHECK(size_ > 1, "recv in a group of one process");
  TORCH_CHECK(tensor.is_contiguous(), "recv needs a contiguous buffer");
  std::vector<Tensor> tensors{tensor};
  wait_for(impl_->pg->recv(tensors, static_cast<int>(peer), tag), "recv", impl_->description);
}

namespace {

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

/// One group over `members` (global ranks, in group-rank order) if this rank is among them.
Group make_group(const std::string& name, const std::vector<int64_t>& members, const WorldInfo& world,
                 const c10::intrusive_ptr<c10d::Store>& store, const config::ParallelConfig& options,
                 bool use_nccl, GroupsOfOne groups_of_one) {
  Group group;
  const auto it = std::find(members.begin(), members.end(), world.rank);
  TORCH_CHECK(it != members.end(), "rank ", world.rank, " is not in group ", name);
  if (members.size() == 1 && groups_of_one == GroupsOfOne::kSkip) return group;
  const int rank = static_cast<int>(it - members.begin()), size = static_cast<int>(members.size());
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
  const auto timeout = std::chrono::milliseconds(options.timeout_s * 1000);
  c10::intrusive_ptr<c10d::Backend> pg;
  if (use_nccl) {
#ifdef USE_C10D_NCCL
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = timeout;
    pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, nccl_options);
#else
    TORCH_CHECK(false, "parallel.backend nccl: this build of LibTorch has no NCCL");
#endif
  } else {
#ifdef YUANMOE_HAVE_GLOO
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (is_loopback(world.master_addr)) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    gloo_options->threads = 2;
    pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, gloo_options);
#else
    TORCH_CHECK(false, "Gloo: this build found no gloo/ headers (Debian: libgloo-dev), so it has no CPU process groups");
#endif
  }
  std::string description = name.substr(0, name.find('/')) + " group of ranks ";
  for (size_t i = 0; i < members.size(); ++i) description += (i ? ", " : "") + std::to_string(members[i]);
  return Group(std::make_shared<Group::Impl>(Group::Impl{pg, description}), rank, size);
}

}  // namespace

ParallelContext ParallelContext::connect(const WorldInfo& world, int64_t pipeline_stages,
                                         const config::ParallelConfig& options, torch::Device device,
                                         GroupsOfOne groups_of_one) {
  ParallelContext context;
  context.world_ = world;
  if (pipeline_stages < 1 || world.world_size % pipeline_stages != 0) {
    throw std::invalid_argument("parallel.pipeline_parallel_size " + std::to_string(pipeline_stages) +
                                " does not divide the world size " + std::to_string(world.world_size));
  }
  ParallelLayout& layout = context.layout_;
  layout.pp = pipeline_stages;
  layout.dp = world.world_size / pipeline_stages;
  layout.stage = world.rank / layout.dp;
  layout.dp_rank = world.rank % layout.dp;
  if (options.expert < 1 || layout.dp % options.expert != 0) {
    throw std::invalid_argument("parallel.expert " + std::to_string(options.expert) +
                                " does not divide the data-parallel size " + std::to_string(layout.dp));
  }
  layout.ep = options.expert;
  layout.ep_rank = layout.dp_rank % layout.ep;
  if (world.world_size == 1 && groups_of_one == GroupsOfOne::kSkip) return context;

  const bool use_nccl = options.backend == config::Backend::kNccl ||
                        (options.backend == config::Backend::kAuto && device.is_cuda());
#ifdef USE_C10D_NCCL
  if (device.is_cuda()) c10::cuda::set_device(static_cast<c10::DeviceIndex>(world.local_rank));
#endif
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(world.master_port);
  store_options.isServer = world.rank == 0 && !world.agent_store;
  store_options.numWorkers = static_cast<size_t>(world.world_size);
  store_options.waitWorkers = !world.agent_store;
  store_options.timeout = std::chrono::milliseconds(options.timeout_s * 1000);
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, store_options);
  } catch (const std::exception& e) {
    throw std::runtime_error("rendezvous at " + world.master_addr + ":" + std::to_string(world.master_port) +
                             " failed (" + world.launcher + ", rank " + std::to_string(world.rank) + " of " +
                             std::to_string(world.world_size) + "): " + e.what());
  }
  if (world.agent_store) {
    store = c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + std::to_string(world.restart_count), store);
  }
  context.rendezvous_ = std::make_shared<Rendezvous>(Rendezvous{store});
  const auto group = [&](const std::string& name, const std::vector<int64_t>& members, bool nccl) {
    return make_group(name, members, world, store, options, nccl, groups_of_one);
  };

  // Every rank builds its groups in the same order (world, dp, pp, embedding, ep, edp), so the
  // full-mesh connections in the constructors cannot wait on each other in a cycle.
  std::vector<int64_t> everyone, dp_members, pp_members;
  for (int64_t r = 0; r < world.world_size; ++r) everyone.push_back(r);
  for (int64_t d = 0; d < layout.dp; ++d) dp_members.push_back(layout.stage * layout.dp + d);
  for (int64_t s = 0; s < layout.pp; ++s) pp_members.push_back(s * layout.dp + layout.dp_rank);
  // World traffic (metrics, loads) is small and host-side: always Gloo.
  context.world_group = group("world/", everyone, /*nccl=*/false);
  context.dp = group("dp/" + std::to_string(layout.stage) + "/", dp_members, use_nccl);
  context.pp = group("pp/" + std::to_string(layout.dp_rank) + "/", pp_members, use_nccl);
  if (layout.pp > 1 && (layout.first_stage() || layout.last_stage())) {
    const std::vector<int64_t> ends{layout.dp_rank, (layout.pp - 1) * layout.dp + layout.dp_rank};
    context.embedding =
        group("embedding/" + std::to_string(layout.dp_rank) + "/", ends, use_nccl);
  }
  if (layout.ep > 1) {
    const int64_t block = layout.dp_rank / layout.ep;  // which ep group of the stage
    std::vector<int64_t> ep_members, edp_members;
    for (int64_t i = 0; i < layout.ep; ++i) ep_members.push_back(layout.stage * layout.dp + block * layout.ep + i);
    for (int64_t j = 0; j < layout.dp / layout.ep; ++j) {
      edp_members.push_back(layout.stage * layout.dp + j * layout.ep + layout.ep_rank);
    }
    const std::string stage = std::to_string(layout.stage) + "/";
    context.ep = group("ep/" + stage + std::to_string(block) + "/", ep_members, use_nccl);
    context.edp = group("edp/" + stage + std::to_string(layout.ep_rank) + "/", edp_members, use_nccl);
  } else {
    context.edp = context.dp;  // every rank holds every expert: experts reduce like any weight
  }
  return context;
}

void ParallelContext::report_failure(const std::string& message) const {
  if (!rendezvous_) return;
  try {
    const std::string text = "rank " + std::to_string(world_.rank) + ": " + message;
    // compareSet keeps the first reporter's message.
    rendezvous_->store->compareSet("failure", {}, std::vector<uint8_t>(text.begin(), text.end()));
  } catch (...) {
  }
}

std::optional<std::string> ParallelContext::first_failure() const {
  if (!rendezvous_) return std::nullopt;
  try {
    if (!rendezvous_->store->check({"failure"})) return std::nullopt;
    const std::vector<uint8_t> bytes = rendezvous_->store->get("failure");
    return std::string(bytes.begin(), bytes.end());
  } catch (...) {
    return std::nullopt;
  }
}

}  // namespace yuanmoe::parallel
