#include "yuanmoe/train/gradient_sync.h"

#include <cmath>

#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {

void sum_tied_embedding_gradient(const Tensor& tied_embedding, const parallel::ParallelContext& parallel) {
  torch::NoGradGuard no_grad;
  if (!tied_embedding.defined() || parallel.embedding.size() == 1) return;
  Tensor weight = tied_embedding;
  if (!weight.grad().defined()) weight.mutable_grad() = torch::zeros_like(weight);
  Tensor grad = weight.grad();
  parallel.embedding.all_reduce_sum(grad);
}

void synchronize_gradients(const std::vector<Tensor>& parameters, const Tensor& tied_embedding,
                           const parallel::ParallelContext& parallel) {
  sum_tied_embedding_gradient(tied_embedding, parallel);
  all_reduce_mean(parameters, parallel.dp, parallel.dp.size());
}

void all_reduce_mean(const std::vector<Tensor>& parameters, const parallel::Group& group, int64_t divisor) {
  torch::NoGradGuard no_grad;
  if (divisor == 1 && !group.connected()) return;
  // Gloo has no AVG: sum, then divide.
  constexpr int64_t kBucketBytes = 25 << 20;
  std::vector<Tensor> bucket;
  int64_t bucket_bytes = 0;
  const auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<Tensor> flat_parts;
    // fp32 (bf16 gradients are summed in fp32), fp64 under train.precision = fp64.
    const torch::Dtype dtype = bucket.front().scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
    for (const Tensor& g : bucket) flat_parts.push_back(g.reshape(-1).to(dtype));
    Tensor flat = torch::cat(flat_parts);  // [bucket elements]
    group.all_reduce_sum(flat);
    flat.div_(static_cast<double>(divisor));
    int64_t offset = 0;
    for (Tensor& g : bucket) {
      g.copy_(flat.narrow(0, offset, g.numel()).view_as(g));
      offset += g.numel();
    }
    bucket.clear();
    bucket_bytes = 0;
  };
  for (Tensor p : parameters) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    bucket.push_back(p.grad());
    bucket_bytes += p.numel() * 4;
    if (bucket_bytes >= kBucketBytes) flush();
  }
  flush();
}

double global_gradient_norm(const std::vector<Tensor>& parameters, const parallel::ParallelContext& parallel) {
  // On the parameters' device: NCCL reduces device tensors only.
  const torch::Device device = parameters.empty() ? torch::Device(torch::kCPU) : parameters.front().device();
  Tensor squared = torch::tensor({squared_gradient_norm(parameters)}, torch::kDouble).to(device);
  parallel.pp.all_reduce_sum(squared);
  return std::sqrt(squared.item<double>());
}

}  // namespace yuanmoe::train
