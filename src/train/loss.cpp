#include "yuanmoe/train/loss.h"

namespace yuanmoe::train {

Tensor language_model_loss(const Tensor& logits_BSV, const Tensor& labels_BS) {
  const int64_t vocab = logits_BSV.size(-1);
  const Tensor logits_TV = logits_BSV.reshape({-1, vocab});
  return torch::nn::functional::cross_entropy(logits_TV.to(at_least_fp32(logits_TV)),
                                              labels_BS.reshape({-1}));
}

}  // namespace yuanmoe::train
