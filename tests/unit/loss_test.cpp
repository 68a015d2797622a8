// The language-model loss: a mean over the counted labels, ignored positions without gradient.
#include "support/fixtures.h"
#include "yuanmoe/train/loss.h"

#include <ATen/Parallel.h>
#include <cmath>

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

// The fused loss against PyTorch's cross_entropy in fp64, loss and gradient, over several row
// blocks (2^19 / 4096 = 128 rows each), with ignored labels and an upstream gradient other than 1.
TEST(LanguageModelLossTest, EqualsPyTorchCrossEntropyWithGradientsInFp64) {
  torch::manual_seed(3);
  const int64_t tokens = 300, vocab = 4096;
  const Tensor logits = (3 * torch::randn({tokens, vocab}, torch::kDouble)).requires_grad_(true);
  Tensor labels = torch::randint(vocab, {tokens}, torch::kLong);
  labels.index_put_({torch::randint(tokens, {40}, torch::kLong)}, kIgnoredLabel);
  const Tensor loss = language_model_loss(logits.view({3, 100, vocab}), labels.view({3, 100}));
  (0.37 * loss).backward();

  const Tensor reference_logits = logits.detach().clone().requires_grad_(true);
  const Tensor want = torch::nn::functional::cross_entropy(
      reference_logits, labels, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoredLabel));
  (0.37 * want).backward();
  EXPECT_NEAR(loss.item<double>(), want.item<double>(), 1e-12);
  EXPECT_LT((logits.grad() - reference_logits.grad()).abs().max().item<double>(), 1e-15);
  EXPECT_EQ(logits.grad().index({labels == kIgnoredLabel}).abs().max().item<double>(), 0.0);
}

// fp32: the same bits at any thread count (each row's arithmetic does not depend on the blocks),
// within fp32 rounding of the fp64 loss, and finite where a probability underflows.
TEST(LanguageModelLossTest, Fp32IsThreadCountIndependentAndFiniteForSpreadLogits) {
  torch::manual_seed(4);
  Tensor logits = torch::randn({257, 1000});
  logits.index_put_({0, 7}, 120.0);  // row 0's other probabilities are below 1e-50: 0 in fp32
  const Tensor labels = torch::randint(1000, {257}, torch::kLong);
  const auto run = [&](int threads) {
    at::set_num_threads(threads);
    const Tensor x = logits.clone().requires_grad_(true);
    const Tensor loss = language_model_loss(x, labels);
    loss.backward();
    return std::make_pair(loss.detach(), x.grad());
  };
  const int threads = at::get_num_threads();
  const auto [loss_1, grad_1] = run(1);
  const auto [loss_2, grad_2] = run(2);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(loss_1, loss_2));
  EXPECT_TRUE(torch::equal(grad_1, grad_2));
  const double want = language_model_loss(logits.to(torch::kDouble), labels).item<double>();
  EXPECT_TRUE(std::isfinite(loss_1.item<float>()));
  EXPECT_NEAR(loss_1.item<double>(), want, 1e-5 * want);
}

// bf16 logits: the loss runs in fp32 and the gradient comes back in bf16, as under autocast.
TEST(LanguageModelLossTest, Bf16LogitsGiveAnFp32LossAndABf16Gradient) {
  torch::manual_seed(5);
  const Tensor logits = torch::randn({8, 50}).to(torch::kBFloat16).requires_grad_(true);
  const Tensor labels = torch::randint(50, {8}, torch::kLong);
  const Tensor loss = language_model_loss(logits, labels);
  EXPECT_EQ(loss.scalar_type(), torch::kFloat);
  EXPECT_NEAR(loss.item<double>(), language_model_loss(logits.detach().to(torch::kDouble), labels).item<double>(),
              1e-6);
  loss.backward();
  EXPECT_EQ(logits.grad().scalar_type(), torch::kBFloat16);
}

// overwrite_logits keeps the softmax terms in the logits' memory (the train step's case): the
// same loss and gradient bits as with a buffer of their own, at 1 and 2 threads, with ignored
// labels; the logits the caller passed are then spent (they hold the exponentials).
TEST(LanguageModelLossTest, OverwritingTheLogitsGivesTheSameLossAndGradient) {
  torch::manual_seed(6);
  const int num_threads = at::get_num_threads();
  for (const int threads : {1, 2}) {
    at::set_num_threads(threads);
    const Tensor h = torch::randn({3, 40, 16}).requires_grad_(true);
    const Tensor w = torch::randn({300, 16});
    Tensor labels = torch::randint(300, {3, 40}, torch::kLong);
    labels.narrow(1, 0, 5).fill_(kIgnoredLabel);
    Tensor losses[2], grads[2];
    for (const bool overwrite : {false, true}) {
      const Tensor logits = torch::matmul(h, w.t());  // an autograd output, as the model's head gives
      const Tensor kept = logits.detach().clone();
      losses[overwrite] = language_model_loss(logits, labels, overwrite);
      grads[overwrite] = torch::autograd::grad({losses[overwrite]}, {h})[0];
      EXPECT_EQ(torch::equal(logits.detach(), kept), !overwrite) << "overwrite " << overwrite;
    }
    EXPECT_TRUE(torch::equal(losses[0], losses[1])) << threads << " threads";
    EXPECT_TRUE(torch::equal(grads[0], grads[1])) << threads << " threads";
  }
  at::set_num_threads(num_threads);
}

// The backward writes the gradient over the forward's saved exponentials: a second backward
// through the same graph is refused by name, not answered with a wrong gradient.
TEST(LanguageModelLossTest, ASecondBackwardIsRefused) {
  const Tensor logits = torch::randn({4, 10}).requires_grad_(true);
  const Tensor loss = language_model_loss(logits, torch::tensor({1, 2, 3, 4}, torch::kLong));
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_THROW(
      {
        try {
          loss.backward();
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("language_model_loss: backward ran twice"), std::string::npos);
          throw;
        }
      },
      c10::Error);
}

}  // namespace
}  // namespace yuanmoe::train
