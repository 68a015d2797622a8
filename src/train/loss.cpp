#include "yuanmoe/train/loss.h"

#include <algorithm>

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

int64_t counted_labels(const Tensor& labels) {
  TORCH_CHECK(labels.device().is_cpu(), "counted_labels: labels on ", labels.device(), ", expected the host");
  const Tensor values = labels.to(torch::kLong).contiguous();
  const int64_t* first = values.data_ptr<int64_t>();
  return std::count_if(first, first + values.numel(), [](int64_t label) { return label != kIgnoredLabel; });
}

}  // namespace yuanmoe::train
