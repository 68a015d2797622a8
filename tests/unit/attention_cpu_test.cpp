// The CPU causal attention kernel (src/model/attention_cpu.cpp) against the materialised softmax
// (causal_attention) in fp64 with gradients, with document masks, at lengths around its 64-row
// query blocks; its fp32 bits at 1 and 2 threads; and the inputs it leaves to SDPA.
#include "support/fixtures.h"
#include "yuanmoe/model/attention_cpu.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using testing::max_abs_diff;
using AttentionCpuTest = testing::SeededTest;

/// Document ids of rows made of documents of the given lengths: [B, S] int64.
Tensor documents_of(const std::vector<std::vector<int64_t>>& rows) {
  std::vector<Tensor> ids;
  for (const auto& lengths : rows) {
    std::vector<Tensor> parts;
    for (size_t d = 0; d < lengths.size(); ++d) parts.push_back(torch::full({lengths[d]}, static_cast<int64_t>(d)));
    ids.push_back(torch::cat(parts));
  }
  return torch::stack(ids);
}

/// The kernel through the model's layout ([B, H, S, D] views of [B, S, H, D] data) and the
/// materialised reference on the same inputs: outputs and the q, k, v gradients of one d_out.
void expect_equal_to_materialised(int64_t seq, const Tensor& documents, double tolerance) {
  const auto options = torch::dtype(torch::kDouble).requires_grad(true);
  const Tensor q = torch::randn({2, seq, 3, 8}, options), k = torch::randn({2, seq, 3, 8}, options);
  const Tensor v = torch::randn({2, seq, 3, 6}, options);
  const Tensor d_out = torch::randn({2, 3, seq, 6}, torch::kDouble);
  const Tensor q_BHSD = q.transpose(1, 2), k_BHSD = k.transpose(1, 2), v_BHSD = v.transpose(1, 2);
  const Tensor expected = causal_attention(q_BHSD, k_BHSD, v_BHSD, 0.0, 0, documents);
  const auto expected_grads = torch::autograd::grad({expected}, {q, k, v}, {d_out});
  const Tensor actual = attention_core(config::AttentionKernel::kSdpa, q_BHSD, k_BHSD, v_BHSD, 0.0, 0, documents);
  const auto actual_grads = torch::autograd::grad({actual}, {q, k, v}, {d_out});
  EXPECT_LT(max_abs_diff(actual, expected), tolerance) << "S " << seq;
  const char* names[] = {"q", "k", "v"};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_LT(max_abs_diff(actual_grads[i], expected_grads[i]), 10 * tolerance) << names[i] << ", S " << seq;
    // A gradient worth comparing; with one key the softmax is constant and q, k get none.
    if (seq > 1 || i == 2) EXPECT_GT(expected_grads[i].abs().max().item<double>(), 1e-2) << names[i];
  }
}

class AttentionCpuLengthTest : public testing::SeededTestWithParam<int64_t> {};

// Lengths of one token, within one block, at and across block edges, and several blocks with a
// partial last one.
TEST_P(AttentionCpuLengthTest, EqualsMaterialisedSoftmaxInDoubleWithGradients) {
  ASSERT_TRUE(causal_attention_cpu_applies(torch::zeros({2, GetParam(), 3, 8}, torch::kDouble),
                                           torch::zeros({2, GetParam(), 3, 8}, torch::kDouble),
                                           torch::zeros({2, GetParam(), 3, 6}, torch::kDouble), {}));
  expect_equal_to_materialised(GetParam(), {}, 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Lengths, AttentionCpuLengthTest, ::testing::Values(1, 13, 64, 65, 129, 300));

// Packed documents: row 0 has documents of 70, 1 and 79 tokens (the second and third start
// inside a query block, the first spans two), row 1 one document.
TEST_F(AttentionCpuTest, TheDocumentMaskEqualsMaterialisedInDoubleWithGradients) {
  expect_equal_to_materialised(150, documents_of({{70, 1, 79}, {150}}), 1e-12);
}

// fp32: each (row, head) runs on one thread, so the thread count cannot change the bits; the
// values agree with the fp64 reference and with libtorch's SDPA to fp32 rounding.
TEST_F(AttentionCpuTest, Fp32IsThreadIndependentAndAgreesWithSdpa) {
  const Tensor q = torch::randn({2, 100, 4, 16}).requires_grad_(true), k = torch::randn({2, 100, 4, 16});
  const Tensor v = torch::randn({2, 100, 4, 16}), d_out = torch::randn({2, 100, 4, 16});
  const int threads = at::get_num_threads();
  std::vector<Tensor> runs;
  for (const int n : {1, 2}) {
    at::set_num_threads(n);
    const Tensor out = causal_attention_cpu(q, k, v);
    runs.push_back(out.detach());
    runs.push_back(torch::autograd::grad({out}, {q}, {d_out})[0]);
  }
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(runs[0], runs[2]));
  EXPECT_TRUE(torch::equal(runs[1], runs[3]));
  const auto bhsd = [](const Tensor& x) { return x.detach().transpose(1, 2); };
  const Tensor exact = causal_attention(bhsd(q).to(torch::kDouble), bhsd(k).to(torch::kDouble),
                                        bhsd(v).to(torch::kDouble), 0.0).transpose(1, 2);
  EXPECT_LT(max_abs_diff(runs[0].to(torch::kDouble), exact), 1e-5);
  const Tensor sdpa = sdpa_causal_attention(bhsd(q), bhsd(k), bhsd(v)).transpose(1, 2);
  EXPECT_LT(max_abs_diff(runs[0], sdpa), 1e-5);
}

// What the kernel leaves to SDPA (besides other devices): bf16, keys of another shape than the
// queries, sequences over 1,024 tokens, and document ids that are not contiguous runs.
TEST_F(AttentionCpuTest, LeavesOtherInputsToSdpa) {
  const Tensor x = torch::randn({1, 6, 2, 4});
  EXPECT_TRUE(causal_attention_cpu_applies(x, x, x, documents_of({{2, 4}})));
  EXPECT_FALSE(causal_attention_cpu_applies(x.to(torch::kBFloat16), x.to(torch::kBFloat16), x.to(torch::kBFloat16), {}));
  EXPECT_FALSE(causal_attention_cpu_applies(x, torch::randn({1, 6, 2, 5}), x, {}));
  const Tensor long_x = torch::zeros({1, 1025, 1, 4});
  EXPECT_FALSE(causal_attention_cpu_applies(long_x, long_x, long_x, {}));
  EXPECT_FALSE(causal_attention_cpu_applies(x, x, x, torch::tensor({0, 0, 1, 1, 0, 0}, torch::kLong).view({1, 6})));
}

}  // namespace
}  // namespace yuanmoe::model
