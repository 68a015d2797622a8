// RMSNorm against its formula written as loops; RoPE against the complex-number form.
#include <ATen/Parallel.h>
#include <complex>

#include "support/fixtures.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using testing::max_abs_diff;
using NormRopeTest = testing::SeededTest;

TEST_F(NormRopeTest, RmsNormMatchesExplicitLoops) {
  RmsNorm norm(8, 1e-6);
  norm->weight.data().uniform_(0.5, 1.5);
  const auto x = torch::randn({3, 5, 8});
  const auto y = norm(x);
  auto expected = torch::empty_like(x);
  auto xa = x.accessor<float, 3>();
  auto wa = norm->weight.accessor<float, 1>();
  for (int b = 0; b < 3; ++b) {
    for (int s = 0; s < 5; ++s) {
      double mean_square = 0;
      for (int d = 0; d < 8; ++d) mean_square += double(xa[b][s][d]) * xa[b][s][d] / 8.0;
      for (int d = 0; d < 8; ++d) {
        expected[b][s][d] = wa[d] * xa[b][s][d] / std::sqrt(mean_square + 1e-6);
      }
    }
  }
  EXPECT_LT(max_abs_diff(y, expected), 1e-5);
}

TEST_F(NormRopeTest, RmsNormKeepsBf16DtypeAndComputesStatisticsInFp32) {
  RmsNorm norm(16, 1e-6);
  const auto x = torch::randn({4, 16}) * 100;
  const auto y = norm(x.to(torch::kBFloat16));
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_LT(max_abs_diff(y, norm(x)), 2e-2);
}

/// Reference: pairs (i, i + r/2) as the complex number x_i + j x_{i+r/2}, multiplied by
/// e^{j m theta_i} with theta_i = base^(-2i/r); dims >= r unchanged.
torch::Tensor rope_complex_reference(const torch::Tensor& x_BSHDh,
                                     const torch::Tensor& positions_BS,
                                     int64_t rotary_dim,
                                     double base) {
  auto out = x_BSHDh.to(torch::kDouble).clone();
  const int64_t half = rotary_dim / 2;
  for (int64_t b = 0; b < x_BSHDh.size(0); ++b) {
    for (int64_t s = 0; s < x_BSHDh.size(1); ++s) {
      const double m = positions_BS[b][s].item<double>();
      for (int64_t h = 0; h < x_BSHDh.size(2); ++h) {
        for (int64_t i = 0; i < half; ++i) {
          const double theta = std::pow(base, -2.0 * i / rotary_dim);
          const std::complex<double> z(out[b][s][h][i].item<double>(),
                                       out[b][s][h][i + half].item<double>());
          const std::complex<double> rotated = z * std::polar(1.0, m * theta);
          out[b][s][h][i] = rotated.real();
          out[b][s][h][i + half] = rotated.imag();
        }
      }
    }
  }
  return out;
}

// The CPU kernel's gradients against autograd through the formula, in fp64; 150 rows span three
// tasks of 64.
TEST_F(NormRopeTest, RmsNormGradientsMatchTheFormulaInFp64) {
  RmsNorm norm(24, 1e-6);
  norm->to(torch::kDouble);
  norm->weight.data().uniform_(0.5, 1.5);
  const auto x = torch::randn({3, 50, 24}, torch::kDouble).requires_grad_(true);
  const auto g = torch::randn({3, 50, 24}, torch::kDouble);
  (norm(x) * g).sum().backward();

  const auto x_ref = x.detach().clone().requires_grad_(true);
  const auto w_ref = norm->weight.detach().clone().requires_grad_(true);
  const auto y_ref = x_ref * torch::rsqrt(x_ref.pow(2).mean(-1, true) + 1e-6) * w_ref;
  (y_ref * g).sum().backward();
  EXPECT_LT(max_abs_diff(norm(x), y_ref), 1e-14);
  EXPECT_LT(max_abs_diff(x.grad(), x_ref.grad()), 1e-13);
  EXPECT_LT(max_abs_diff(norm->weight.grad(), w_ref.grad()), 1e-12);
}

// fp32: the same bits at 1 and 2 threads, the weight gradient's partial sums included.
TEST_F(NormRopeTest, RmsNormIsThreadCountIndependent) {
  RmsNorm norm(32, 1e-6);
  norm->weight.data().uniform_(0.5, 1.5);
  const auto x = torch::randn({300, 32});
  const auto g = torch::randn({300, 32});
  const auto run = [&](int threads) {
    at::set_num_threads(threads);
    norm->zero_grad();
    const auto x_leaf = x.clone().requires_grad_(true);
    const auto y = norm(x_leaf);
    (y * g).sum().backward();
    return std::vector<Tensor>{y.detach(), x_leaf.grad(), norm->weight.grad().clone()};
  };
  const int threads = at::get_num_threads();
  const auto one = run(1), two = run(2);
  at::set_num_threads(threads);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(torch::equal(one[i], two[i])) << i;
}

TEST_F(NormRopeTest, PartialRopeMatchesComplexForm) {
  const int64_t rotary_dim = 8, head_dim = 16;
  const auto x = torch::randn({2, 6, 3, head_dim});
  // Row 1 has positions reset after an end-of-document token at index 2.
  const auto positions = torch::tensor({0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2}, torch::kLong).view({2, 6});
  const auto angles = rope_angles(rope_inverse_frequencies(rotary_dim, 10000.0), positions);
  const auto y = apply_rope(x, angles, rotary_dim);
  const auto expected = rope_complex_reference(x, positions, rotary_dim, 10000.0);
  EXPECT_LT(max_abs_diff(y, expected), 1e-5);
  // Dims beyond rotary_dim pass through bit-exactly.
  EXPECT_TRUE(torch::equal(y.narrow(-1, rotary_dim, head_dim - rotary_dim),
                           x.narrow(-1, rotary_dim, head_dim - rotary_dim)));
}

// The hand-written RoPE over Yuan's per-head [q | k] slices against the rotation written with
// autograd ops, outputs and input gradient in fp64; a part without gradient gets zeros.
TEST_F(NormRopeTest, RopeOverPartsMatchesTheFormulaWithGradientsInFp64) {
  const int64_t rotary_dim = 8, head_dim = 16, half = rotary_dim / 2;
  const auto x = torch::randn({2, 5, 3, 2 * head_dim}, torch::kDouble).requires_grad_(true);
  const auto positions = torch::arange(10, torch::kLong).view({2, 5});
  RopeAngles angles = rope_angles(rope_inverse_frequencies(rotary_dim, 10000.0), positions);
  angles = {angles.cos.to(torch::kDouble), angles.sin.to(torch::kDouble)};
  const std::vector<Tensor> parts = apply_rope_to_parts(x, angles, rotary_dim, 2);
  const auto g_q = torch::randn_like(parts[0]), g_k = torch::randn_like(parts[1]);
  (parts[0] * g_q + parts[1] * g_k).sum().backward();

  const auto x_ref = x.detach().clone().requires_grad_(true);
  const auto formula = [&](const Tensor& p) {
    const auto x1 = p.narrow(-1, 0, half), x2 = p.narrow(-1, half, half);
    return torch::cat({x1 * angles.cos - x2 * angles.sin, x2 * angles.cos + x1 * angles.sin,
                       p.narrow(-1, rotary_dim, head_dim - rotary_dim)},
                      -1);
  };
  const auto q_ref = formula(x_ref.narrow(-1, 0, head_dim)), k_ref = formula(x_ref.narrow(-1, head_dim, head_dim));
  (q_ref * g_q + k_ref * g_k).sum().backward();
  EXPECT_LT(max_abs_diff(parts[0], q_ref), 1e-15);
  EXPECT_LT(max_abs_diff(parts[1], k_ref), 1e-15);
  EXPECT_LT(max_abs_diff(x.grad(), x_ref.grad()), 1e-15);

  const auto x_q = x.detach().clone().requires_grad_(true);
  apply_rope_to_parts(x_q, angles, rotary_dim, 2)[0].sum().backward();  // k unused: no gradient
  EXPECT_EQ(x_q.grad().narrow(-1, head_dim, head_dim).abs().max().item<double>(), 0.0);
  EXPECT_GT(x_q.grad().narrow(-1, 0, head_dim).abs().max().item<double>(), 0.1);
}

TEST_F(NormRopeTest, RotatedDotProductDependsOnlyOnRelativePosition) {
  const int64_t rotary_dim = 16;
  const auto q = torch::randn({1, 1, 1, rotary_dim});
  const auto k = torch::randn({1, 1, 1, rotary_dim});
  const auto inverse = rope_inverse_frequencies(rotary_dim, 10000.0);
  const auto score = [&](int64_t m, int64_t n) {
    const auto qm = apply_rope(q, rope_angles(inverse, torch::full({1, 1}, m, torch::kLong)), rotary_dim);
    const auto kn = apply_rope(k, rope_angles(inverse, torch::full({1, 1}, n, torch::kLong)), rotary_dim);
    return (qm * kn).sum().item<double>();
  };
  EXPECT_NEAR(score(7, 3), score(104, 100), 1e-4);
  EXPECT_GT(std::abs(score(7, 3) - score(7, 6)), 1e-4);
}

TEST(RopeTables, ReferenceBf16ModesRoundWhereTheReferencesDo) {
  using config::RopeTables;
  const int64_t rotary_dim = 128;
  const Tensor exact = rope_inverse_frequencies(rotary_dim, 10000.0);
  const Tensor rounded = rope_inverse_frequencies(rotary_dim, 10000.0, RopeTables::kMegatronBf16);
  // bf16 keeps 8 significant bits: relative error <= 2^-8 (0.37% here, docs/model.md §12.2).
  EXPECT_LE(((rounded - exact).abs() / exact).max().item<double>(), 1.0 / 256);
  EXPECT_FALSE(torch::equal(rounded, exact));
  EXPECT_TRUE(torch::equal(rope_inverse_frequencies(rotary_dim, 10000.0, RopeTables::kHfBf16), rounded));

  // docs/model.md §12.2: HF's bf16 positions quantise 257 to 256; exact and Megatron tables keep them apart.
  const auto positions = torch::tensor({256, 257, 4095, 4096}, torch::kLong).view({1, 4});
  const RopeAngles hf = rope_angles(rounded, positions, RopeTables::kHfBf16);
  EXPECT_TRUE(torch::equal(hf.cos[0][0], hf.cos[0][1]));
  EXPECT_TRUE(torch::equal(hf.sin[0][2], hf.sin[0][3]));  // 4095 -> 4096
  EXPECT_TRUE(torch::equal(hf.cos, hf.cos.to(torch::kBFloat16).to(torch::kFloat)));  // bf16 values
  const RopeAngles megatron = rope_angles(rounded, positions, RopeTables::kMegatronBf16);
  EXPECT_FALSE(torch::equal(megatron.cos[0][0], megatron.cos[0][1]));
  // HF also rounds the angle itself: below 8 rad bf16 spacing is <= 2^-5, so cos moves < 0.02;
  // at large angles the error grows to whole radians (why `exact` is the default).
  const auto small = torch::arange(0, 8, torch::kLong).view({1, 8});
  EXPECT_LT(max_abs_diff(rope_angles(rounded, small, RopeTables::kHfBf16).cos, rope_angles(exact, small).cos), 0.02);
}

TEST(RopeBase, NtkAwareRuleGivesYuan16kBase) {
  // The 16K fine-tune (docs/training.md): 10000 * 4^(128/126) = 40889.94 -> 40890.
  EXPECT_NEAR(ntk_scaled_rope_base(10000.0, 4.0, 128), 40889.94, 0.01);
}

}  // namespace
}  // namespace yuanmoe::model
