#include "yuanmoe/train/gradient_buckets.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <chrono>

namespace yuanmoe::train {

int64_t bucket_bytes(const config::ParallelConfig& parallel) {
  return std::max<int64_t>(1, static_cast<int64_t>(parallel.grad_bucket_mb * 1024.0 * 1024.0));
}

/// Runs after the autograd engine has accumulated a new gradient into the parameter's .grad
/// (Tensor.register_post_accumulate_grad_hook in Python).
struct GradientBuckets::Hook final : torch::autograd::PostAccumulateGradHook {
  Hook(GradientBuckets& owner, size_t bucket, size_t parameter) : owner(owner), bucket(bucket), parameter(parameter) {}
  void operator()(const torch::autograd::Variable& /*parameter*/) override { owner.ready(bucket, parameter); }
  GradientBuckets& owner;
  size_t bucket, parameter;
};

GradientBuckets::GradientBuckets(std::vector<Tensor> parameters, std::vector<std::string> names, int64_t held,
                                 const parallel::Group& copies, const parallel::Group& shard, int64_t dp, bool overlap,
                                 int64_t bucket_bytes)
    : parameters_(std::move(parameters)),
      names_(std::move(names)),
      copies_(copies),
      shard_(shard),
      dp_(dp),
      active_(dp > 1 || copies.connected()),
      hooked_(overlap && active_ && copies.connected()),
      bucket_of_(parameters_.size()) {
  const auto add = [&](size_t i, bool new_bucket) {
    if (new_bucket) buckets_.emplace_back();
    GradientBucket& bucket = buckets_.back();
    bucket.parameters.push_back(i);
    bucket.offsets.push_back(bucket.elements);
    bucket.elements += parameters_[i].numel();
    bucket_of_[i] = buckets_.size() - 1;
  };
  for (size_t k = parameters_.size(); k-- > 0;) {
    if (static_cast<int64_t>(k) == held) continue;
    add(k, buckets_.empty() || buckets_.back().elements * parameters_[k].element_size() >= bucket_bytes);
  }
  if (held >= 0) {
    add(static_cast<size_t>(held), /*new_bucket=*/true);
    buckets_.back().held = true;
  }
  for (GradientBucket& bucket : buckets_) bucket.chunk = (bucket.elements + shard_.size() - 1) / shard_.size();

  pending_.resize(buckets_.size());
  reduced_.resize(buckets_.size());
  if (hooked_) {
    for (size_t i = 0; i < parameters_.size(); ++i) {
      TORCH_CHECK(!torch::autograd::impl::post_acc_grad_hooks(parameters_[i]), names_[i],
                  ": already has a post-accumulate-grad hook (a second optimizer over the same parameters?)");
      torch::autograd::impl::set_post_acc_grad_hooks(parameters_[i], std::make_unique<Hook>(*this, bucket_of_[i], i));
    }
  }
  next_ = buckets_.size();  // nothing in flight
}

GradientBuckets::~GradientBuckets() {
  if (!hooked_) return;
  for (const Tensor& parameter : parameters_) torch::autograd::impl::set_post_acc_grad_hooks(parameter, nullptr);
}

void GradientBuckets::arm() {
  next_ = 0;
  if (!hooked_) return;
  armed_ = true;
  is_ready_.assign(parameters_.size(), 0);
  waiting_.clear();
  for (const GradientBucket& bucket : buckets_) waiting_.push_back(bucket.parameters.size());
}

void GradientBuckets::ready(size_t bucket, size_t parameter) {
  if (!armed_) return;  // an earlier micro-batch's backward: its gradients are not complete yet
  // A second accumulation would change a gradient whose bucket may already be on the wire.
  TORCH_CHECK(!is_ready_[parameter], names_[parameter],
              ": a second gradient in the step's last backward; parallel.overlap_grad_reduce = false "
              "reduces after the backward instead");
  is_ready_[parameter] = 1;
  if (--waiting_[bucket] > 0) return;
  while (next_ < buckets_.size() && waiting_[next_] == 0 && !buckets_[next_].held) start(next_++);
}

void GradientBuckets::start(size_t b) {
  torch::NoGradGuard no_grad;
  const GradientBucket& bucket = buckets_[b];
  // The bucket's gradients, flat, then the padding; a missing one is zeros, so that every rank
  // reduces the same elements.
  std::vector<Tensor> parts;
  for (size_t i : bucket.parameters) {
    Tensor& parameter = parameters_[i];
    if (!parameter.grad().defined()) parameter.mutable_grad() = torch::zeros_like(parameter);
    parts.push_back(parameter.grad().reshape(-1));
  }
  const int64_t padding = shard_.size() * bucket.chunk - bucket.elements;
  if (padding > 0) parts.push_back(torch::zeros({padding}, parts.front().options()));
  const Tensor flat = torch::cat(parts);  // [shard x chunk]
  if (shard_.size() > 1) {
    pending_[b] = shard_.start_reduce_scatter_sum(flat, reduced_[b]);  // [chunk]
  } else {
    reduced_[b] = flat;  // summed in place
    pending_[b] = copies_.start_all_reduce_sum(flat);
  }
}

void GradientBuckets::finish(const std::function<void(size_t bucket, const Tensor& mean)>& take) {
  if (!active_) return;
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  const Clock::time_point t0 = Clock::now();
  if (!armed_) next_ = 0;  // no hook started anything
  armed_ = false;
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (b >= next_) start(next_++);
    const Clock::time_point wait_start = Clock::now();
    pending_[b].wait();
    wait_seconds_ += seconds_since(wait_start);
    if (dp_ > 1) reduced_[b].div_(static_cast<double>(dp_));  // Gloo has no AVG: sum, then divide
    take(b, reduced_[b]);
    reduced_[b] = Tensor();
  }
  finish_seconds_ += seconds_since(t0);
}

}  // namespace yuanmoe::train
