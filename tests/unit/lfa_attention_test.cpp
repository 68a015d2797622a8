// LFA: the shifted-GEMM form against the reference Conv2d form and against per-token loops.
// Attention: the module against explicit loops over heads and positions, with the per-head
// interleaved Q/K rows and RoPE written independently. Blockwise attention: against the
// materialised softmax in fp64 (values and gradients) and against finite differences.
#include <complex>

#include "support/fixtures.h"
#include "support/gradcheck.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/model/init.h"

namespace yuanmoe::model {
namespace {

using testing::max_abs_diff;
using LfaTest = testing::SeededTest;
using AttentionTest = testing::SeededTest;

LocalizedFiltering make_lfa(int64_t hidden) {
  LocalizedFiltering lfa(hidden, 1e-6);
  torch::NoGradGuard no_grad;
  for (auto& p : lfa->parameters()) p.uniform_(-0.3, 0.3);
  return lfa;
}

/// The reference code path: Conv2d(kernel (2,1), padding (1,0)) over [B, C, S, 1], first S outputs.
torch::Tensor conv_reference(torch::nn::Conv2d& conv, const torch::Tensor& x_BSC) {
  const int64_t seq = x_BSC.size(1);
  const auto y = conv->forward(x_BSC.permute({0, 2, 1}).unsqueeze(-1));  // [B, O, S + 1, 1]
  return y.narrow(2, 0, seq).squeeze(-1).permute({0, 2, 1});
}

TEST_F(LfaTest, ShiftedGemmEqualsReferenceConvolution) {
  auto lfa = make_lfa(16);
  const auto a = torch::randn({2, 7, 16});
  const auto y1 = causal_two_tap(a, lfa->conv1->weight, lfa->conv1->bias);
  EXPECT_LT(max_abs_diff(y1, conv_reference(lfa->conv1, a)), 1e-5);
  const auto y2 = causal_two_tap(y1, lfa->conv2->weight, lfa->conv2->bias);
  EXPECT_LT(max_abs_diff(y2, conv_reference(lfa->conv2, y1)), 1e-5);
  EXPECT_LT(max_abs_diff(lfa(a), lfa->output_layernorm(conv_reference(lfa->conv2, conv_reference(lfa->conv1, a)) + a)),
            1e-5);
}

TEST_F(LfaTest, MatchesPerTokenRecurrenceWithPreviousTokenOnTapZero) {
  auto lfa = make_lfa(8);
  const auto a = torch::randn({1, 5, 8}).to(torch::kDouble);
  const auto w1 = lfa->conv1->weight.to(torch::kDouble), b1 = lfa->conv1->bias.to(torch::kDouble);
  const auto w2 = lfa->conv2->weight.to(torch::kDouble), b2 = lfa->conv2->bias.to(torch::kDouble);
  const auto w1p = w1.select(3, 0).select(2, 0), w1c = w1.select(3, 0).select(2, 1);
  const auto w2p = w2.select(3, 0).select(2, 0), w2c = w2.select(3, 0).select(2, 1);
  std::vector<torch::Tensor> expected;
  torch::Tensor a_prev = torch::zeros({8}, torch::kDouble), y1_prev = torch::zeros({4}, torch::kDouble);
  for (int t = 0; t < 5; ++t) {
    const auto a_t = a[0][t];
    const auto y1 = torch::mv(w1c, a_t) + torch::mv(w1p, a_prev) + b1;
    const auto y2 = torch::mv(w2c, y1) + torch::mv(w2p, y1_prev) + b2;
    const auto z = y2 + a_t;
    expected.push_back(z / torch::sqrt(z.pow(2).mean() + 1e-6));  // norm weight is ~U, apply below
    a_prev = a_t;
    y1_prev = y1;
  }
  const auto reference = torch::stack(expected).unsqueeze(0) * lfa->output_layernorm->weight.to(torch::kDouble);
  EXPECT_LT(max_abs_diff(lfa(a.to(torch::kFloat)), reference), 1e-5);
}

TEST_F(LfaTest, ReceptiveFieldIsTheTwoPreviousTokens) {
  auto lfa = make_lfa(8);
  auto a = torch::randn({1, 10, 8});
  const auto before = lfa(a);
  a[0][4] += 1.0;
  const auto after = lfa(a);
  const auto changed = (after - before).abs().amax(-1).squeeze(0) > 0;  // [S]
  const auto expected = torch::tensor({0, 0, 0, 0, 1, 1, 1, 0, 0, 0}, torch::kBool);
  EXPECT_TRUE(torch::equal(changed, expected)) << changed;
}

/// Explicit loops: per head h, q rows [2Dh h, 2Dh h + Dh) and k rows [2Dh h + Dh, 2Dh (h+1)) of
/// cat(q_proj, k_proj) (docs/interop.md), RoPE as complex rotation, causal softmax per query.
torch::Tensor attention_reference(AttentionImpl& attn, const torch::Tensor& a_BSD,
                                  const torch::Tensor& positions_BS) {
  const auto& c = attn.config;
  const int64_t B = a_BSD.size(0), S = a_BSD.size(1), H = c.num_attention_heads, Dh = c.head_dim;
  const auto a = a_BSD.to(torch::kDouble);
  const auto qk_in = (c.lfa ? attn.lf_gate(a_BSD) : a_BSD).to(torch::kDouble);
  const auto w_qk = torch::cat({attn.q_proj->weight, attn.k_proj->weight}).to(torch::kDouble);
  const auto w_v = attn.v_proj->weight.to(torch::kDouble);
  auto out = torch::zeros({B, S, H * Dh}, torch::kDouble);
  const auto rotate = [&](torch::Tensor v, double m) {
    for (int64_t i = 0; i < c.rotary_dim / 2; ++i) {
      const double theta = std::pow(c.rope_base, -2.0 * i / c.rotary_dim);
      const std::complex<double> z(v[i].item<double>(), v[i + c.rotary_dim / 2].item<double>());
      const auto r = z * std::polar(1.0, m * theta);
      v[i] = r.real();
      v[i + c.rotary_dim / 2] = r.imag();
    }
    return v;
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const auto wq = w_qk.narrow(0, 2 * Dh * h, Dh), wk = w_qk.narrow(0, 2 * Dh * h + Dh, Dh);
      const auto wv = w_v.narrow(0, Dh * h, Dh);
      std::vector<torch::Tensor> keys, values;
      for (int64_t j = 0; j < S; ++j) {
        keys.push_back(rotate(torch::mv(wk, qk_in[b][j]), positions_BS[b][j].item<double>()));
        values.push_back(torch::mv(wv, a[b][j]));
      }
      for (int64_t i = 0; i < S; ++i) {
        const auto q = rotate(torch::mv(wq, qk_in[b][i]), positions_BS[b][i].item<double>());
        std::vector<double> scores;
        double max_score = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          scores.push_back(torch::dot(q, keys[j]).item<double>() / std::sqrt(double(Dh)));
          max_score = std::max(max_score, scores.back());
        }
        double total = 0;
        for (auto& s : scores) total += (s = std::exp(s - max_score));
        auto head_out = torch::zeros({Dh}, torch::kDouble);
        for (int64_t j = 0; j <= i; ++j) head_out += scores[j] / total * values[j];
        out[b][i].narrow(0, Dh * h, Dh).copy_(head_out);
      }
    }
  }
  return torch::matmul(out, attn.o_proj->weight.to(torch::kDouble).t());
}

class AttentionLoopTest : public testing::SeededTestWithParam<bool> {};

TEST_P(AttentionLoopTest, MatchesExplicitLoops) {
  auto model = testing::small_model_config();
  model.lfa = GetParam();
  Attention attn(model);
  init_weights(*attn, model);
  const auto a = torch::randn({2, 5, model.hidden_size});
  const auto positions = torch::tensor({0, 1, 2, 3, 4, 0, 1, 0, 1, 2}, torch::kLong).view({2, 5});
  EXPECT_LT(max_abs_diff(attn(a, positions), attention_reference(*attn, a, positions)), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(WithAndWithoutLfa, AttentionLoopTest, ::testing::Values(true, false));

// The same module with model.attention = materialised (the S x S scores) against the loops.
TEST_F(AttentionTest, MatchesExplicitLoopsWithMaterialisedScores) {
  auto model = testing::small_model_config();
  model.attention = config::AttentionKernel::kMaterialised;
  Attention attn(model);
  init_weights(*attn, model);
  const auto a = torch::randn({2, 5, model.hidden_size});
  const auto positions = torch::tensor({0, 1, 2, 3, 4, 0, 1, 0, 1, 2}, torch::kLong).view({2, 5});
  EXPECT_LT(max_abs_diff(attn(a, positions), attention_reference(*attn, a, positions)), 1e-5);
}

// The whole module, LFA and partial RoPE around the core, in fp64: model.attention = sdpa and
// = materialised give the same output and the same gradient for every weight and the input.
TEST_F(AttentionTest, SdpaModuleEqualsMaterialisedModuleInDoubleWithGradients) {
  auto model = testing::small_model_config();
  Attention fused(model);
  init_weights(*fused, model);
  fused->to(torch::kDouble);
  model.attention = config::AttentionKernel::kMaterialised;
  Attention reference(model);
  reference->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    for (const auto& item : fused->named_parameters()) reference->named_parameters()[item.key()].copy_(item.value());
  }
  const auto a = torch::randn({2, 9, model.hidden_size}, torch::dtype(torch::kDouble).requires_grad(true));
  const auto positions = torch::tensor({0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8}, torch::kLong).view({2, 9});
  const auto d_out = torch::randn({2, 9, model.hidden_size}, torch::kDouble);
  const auto gradients = [&](Attention& attn) {
    std::vector<Tensor> inputs{a};
    for (const auto& p : attn->parameters()) inputs.push_back(p);
    const Tensor out = attn(a, positions);
    std::vector<Tensor> grads = torch::autograd::grad({out}, inputs, {d_out});
    grads.insert(grads.begin(), out);
    return grads;
  };
  const std::vector<Tensor> x = gradients(fused), y = gradients(reference);
  ASSERT_EQ(x.size(), y.size());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_LT(max_abs_diff(x[i], y[i]), 1e-11) << i;
}

class SdpaLengthTest : public testing::SeededTestWithParam<int64_t> {};

// libtorch's fused SDPA (its CPU flash kernel here) against the materialised softmax, fp64
// values and q/k/v gradients, at lengths around and beyond the kernel's tiles, a value width
// other than the key width, and one token.
TEST_P(SdpaLengthTest, EqualsMaterialisedSoftmaxInDouble) {
  const int64_t seq = GetParam();
  const auto options = torch::dtype(torch::kDouble).requires_grad(true);
  const auto q = torch::randn({2, 3, seq, 8}, options), k = torch::randn({2, 3, seq, 8}, options);
  const auto v = torch::randn({2, 3, seq, 6}, options);
  const auto d_out = torch::randn({2, 3, seq, 6}, torch::kDouble);
  const auto expected = causal_attention(q, k, v, /*dropout_p=*/0.0);
  const auto expected_grads = torch::autograd::grad({expected}, {q, k, v}, {d_out});
  const auto actual = sdpa_causal_attention(q, k, v);
  const auto actual_grads = torch::autograd::grad({actual}, {q, k, v}, {d_out});
  EXPECT_EQ(actual.scalar_type(), torch::kDouble);
  EXPECT_LT(max_abs_diff(actual, expected), 1e-12);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(max_abs_diff(actual_grads[i], expected_grads[i]), 1e-11) << "input " << i;
}

INSTANTIATE_TEST_SUITE_P(Lengths, SdpaLengthTest, ::testing::Values(1, 13, 16, 64, 129, 300));

// Yuan 2.0-M32's head_dim 256, fp64, values and gradients.
TEST_F(AttentionTest, SdpaEqualsMaterialisedSoftmaxAtHeadDim256) {
  const auto options = torch::dtype(torch::kDouble).requires_grad(true);
  const auto q = torch::randn({1, 2, 70, 256}, options), k = torch::randn({1, 2, 70, 256}, options);
  const auto v = torch::randn({1, 2, 70, 256}, options);
  const auto d_out = torch::randn({1, 2, 70, 256}, torch::kDouble);
  const auto expected = causal_attention(q, k, v, 0.0);
  const auto expected_grads = torch::autograd::grad({expected}, {q, k, v}, {d_out});
  const auto actual = sdpa_causal_attention(q, k, v);
  const auto actual_grads = torch::autograd::grad({actual}, {q, k, v}, {d_out});
  EXPECT_LT(max_abs_diff(actual, expected), 1e-12);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(max_abs_diff(actual_grads[i], expected_grads[i]), 1e-11) << "input " << i;
}

// bf16 in, bf16 out (and bf16 grads), accumulated in fp32 inside: within bf16 rounding of fp32.
TEST_F(AttentionTest, SdpaKeepsBf16InputsWithinRoundingOfFp32) {
  const auto q = torch::randn({1, 2, 20, 8}), k = torch::randn({1, 2, 20, 8}), v = torch::randn({1, 2, 20, 8});
  const auto q16 = q.to(torch::kBFloat16).requires_grad_(true), k16 = k.to(torch::kBFloat16);
  const auto out16 = sdpa_causal_attention(q16, k16, v.to(torch::kBFloat16));
  EXPECT_EQ(out16.scalar_type(), torch::kBFloat16);
  const auto exact = causal_attention(q16.detach().to(torch::kFloat), k16.to(torch::kFloat),
                                      v.to(torch::kBFloat16).to(torch::kFloat), 0.0);
  EXPECT_LT(max_abs_diff(out16.to(torch::kFloat), exact), 2e-2);
  out16.sum().backward();
  EXPECT_EQ(q16.grad().scalar_type(), torch::kBFloat16);
}

TEST_F(AttentionTest, IsCausal) {
  const auto model = testing::small_model_config();
  Attention attn(model);
  init_weights(*attn, model);
  auto a = torch::randn({1, 8, model.hidden_size});
  const auto positions = torch::arange(8).unsqueeze(0);
  const auto before = attn(a, positions);
  a[0][5] += 1.0;
  const auto after = attn(a, positions);
  EXPECT_TRUE(torch::equal(before.narrow(1, 0, 5), after.narrow(1, 0, 5)));
  EXPECT_GT(max_abs_diff(before.narrow(1, 5, 3), after.narrow(1, 5, 3)), 1e-6);
}

TEST_F(AttentionTest, DropoutOnlyWhileTraining) {
  auto model = testing::small_model_config();
  model.attention_dropout = 0.5;
  Attention attn(model);
  init_weights(*attn, model);
  const auto a = torch::randn({1, 6, model.hidden_size});
  const auto positions = torch::arange(6).unsqueeze(0);
  attn->eval();
  EXPECT_TRUE(torch::equal(attn(a, positions), attn(a, positions)));
  attn->train();
  EXPECT_FALSE(torch::equal(attn(a, positions), attn(a, positions)));
}

}  // namespace
}  // namespace yuanmoe::model
