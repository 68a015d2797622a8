#include "yuanmoe/train/token_layout.h"

namespace yuanmoe::train {

model::TokenLayout token_layout(const data::Batch& batch, const torch::Device& device) {
  model::TokenLayout tokens;
  tokens.position_ids_BS = batch.position_ids.to(device);  // [B, S]
  if (batch.document_ids.defined()) tokens.document_ids_BS = batch.document_ids.to(device);  // [B, S]
  // Undefined unless some label is ignored, so the usual batch costs no mask downstream.
  if (batch.labels.defined() && (batch.labels < 0).any().item<bool>()) {
    tokens.counted_BS = (batch.labels >= 0).to(device);  // [B, S] bool
  }
  return tokens;
}

}  // namespace yuanmoe::train
