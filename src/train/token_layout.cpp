#include "yuanmoe/train/token_layout.h"

namespace yuanmoe::train {

model::TokenLayout token_layout(const data::Batch& batch, const torch::Device& device) {
  model::TokenLayout tokens;
  // Asynchronous copies: the step queues them with its kernels (core/host_sync.h).
  tokens.position_ids_BS = batch.position_ids.to(device, /*non_blocking=*/true);  // [B, S]
  if (batch.document_ids.defined()) tokens.document_ids_BS = batch.document_ids.to(device, /*non_blocking=*/true);
  return tokens;
}

}  // namespace yuanmoe::train
