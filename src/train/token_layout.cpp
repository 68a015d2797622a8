#include "yuanmoe/train/token_layout.h"

#include <algorithm>

namespace yuanmoe::train {

namespace {

/// Whether some label is negative (ignored), read where the labels are: on the host (the sampler's
/// batches) a scan of their memory, on a device one wait for it.
bool has_ignored_label(const Tensor& labels) {
  if (!labels.device().is_cpu()) return (labels < 0).any().item<bool>();
  const Tensor values = labels.to(torch::kLong).contiguous();
  const int64_t* first = values.data_ptr<int64_t>();
  return std::any_of(first, first + values.numel(), [](int64_t label) { return label < 0; });
}

}  // namespace

model::TokenLayout token_layout(const data::Batch& batch, const torch::Device& device) {
  model::TokenLayout tokens;
  // Asynchronous copies: the step queues them with its kernels (core/host_sync.h).
  tokens.position_ids_BS = batch.position_ids.to(device, /*non_blocking=*/true);  // [B, S]
  if (batch.document_ids.defined()) tokens.document_ids_BS = batch.document_ids.to(device, /*non_blocking=*/true);
  // Undefined unless some label is ignored, so the usual batch costs no mask downstream.
  if (batch.labels.defined() && has_ignored_label(batch.labels)) {
    tokens.counted_BS = (batch.labels >= 0).to(device, /*non_blocking=*/true);  // [B, S] bool
  }
  return tokens;
}

}  // namespace yuanmoe::train
