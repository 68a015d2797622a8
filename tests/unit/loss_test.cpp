// The language-model loss: a mean over the counted labels, ignored positions without gradient.
#include "support/fixtures.h"
#include "yuanmoe/train/loss.h"

namespace yuanmoe::train {
namespace {

// Labels equal to -100 (kIgnoredLabel) do not count: the mean is over the others.
TEST(LanguageModelLossTest, IgnoredLabelsAreLeftOutOfTheMean) {
  torch::manual_seed(2);
  const Tensor logits = torch::randn({2, 4, 7}, torch::kDouble).requires_grad_(true);
  const Tensor labels = torch::tensor({3, -100, 6, 0, -100, -100, 1, 2}, torch::kLong).view({2, 4});
  const Tensor loss = language_model_loss(logits, labels);
  double want = 0;
  int64_t counted = 0;
  for (int64_t t = 0; t < 8; ++t) {
    const int64_t label = labels.view(-1)[t].item<int64_t>();
    if (label == kIgnoredLabel) continue;
    want -= torch::log_softmax(logits.view({8, 7})[t], -1)[label].item<double>();
    ++counted;
  }
  EXPECT_NEAR(loss.item<double>(), want / static_cast<double>(counted), 1e-14);
  loss.backward();
  EXPECT_EQ(logits.grad()[0][1].abs().max().item<double>(), 0.0);  // an ignored position gets no gradient

  const Tensor none = language_model_loss(logits, torch::full({2, 4}, kIgnoredLabel, torch::kLong));
  EXPECT_EQ(none.item<double>(), 0.0);
  logits.mutable_grad() = Tensor();
  none.backward();
  EXPECT_EQ(logits.grad().abs().max().item<double>(), 0.0);
}

}  // namespace
}  // namespace yuanmoe::train
