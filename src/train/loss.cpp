#include "yuanmoe/train/loss.h"

namespace yuanmoe::train {

Tensor language_model_loss(const Tensor& logits_BSV, const Tensor& labels_BS) {
  const int64_t vocab = logits_BSV.size(-1);
  const Tensor logits_TV = logits_BSV.reshape({-1, vocab});
  const Tensor labels_T = labels_BS.reshape({-1});
  const Tensor loss = torch::nn::functional::cross_entropy(
      logits_TV.to(at_least_fp32(logits_TV)), labels_T,
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoredLabel));
  // Every label ignored: the mean over none is 0/0; such a micro-batch adds nothing (no host sync).
  return torch::where((labels_T != kIgnoredLabel).any(), loss, torch::zeros_like(loss));
}

}  // namespace yuanmoe::train
