// small_mm_into and small_mm_add_into: on fp32 with AVX-512 or AVX2 each output element is one
// chain of fused multiply-adds over k in order (from 0, or from out's value when adding), so it
// equals an explicit std::fma loop bit for bit; every tail of rows (6 per tile), columns (64 per
// tile, masked vectors of 16; AVX2: 16 per packed panel, vectors of 8) and k (AVX2: chunks of
// 256), both layouts of a, with out a view whose neighbours must stay untouched, for each
// instruction set this CPU runs. Elsewhere (fp64, other CPUs) they are at::mm_out and addmm_.
#include <cmath>

#include "support/fixtures.h"
#include "yuanmoe/core/small_gemm.h"

namespace yuanmoe {
namespace {

using SmallGemmTest = testing::SeededTest;

/// out(i, j) = fma chain over k, in order, from start(i, j).
Tensor fma_loop_reference(const Tensor& a, const Tensor& b, const Tensor& start) {
  const auto a_acc = a.accessor<float, 2>();
  const auto b_acc = b.accessor<float, 2>();
  Tensor out = start.clone();
  auto out_acc = out.accessor<float, 2>();
  for (int64_t i = 0; i < a.size(0); ++i) {
    for (int64_t j = 0; j < b.size(1); ++j) {
      float acc = out_acc[i][j];
      for (int64_t k = 0; k < a.size(1); ++k) acc = std::fma(a_acc[i][k], b_acc[k][j], acc);
      out_acc[i][j] = acc;
    }
  }
  return out;
}

/// The instruction sets this CPU runs kernels for.
std::vector<CpuKernelIsa> kernel_isas() {
  std::vector<CpuKernelIsa> isas;
  for (const CpuKernelIsa isa : {CpuKernelIsa::kAvx2, CpuKernelIsa::kAvx512}) {
    if (static_cast<int>(isa) <= static_cast<int>(cpu_kernel_isa())) isas.push_back(isa);
  }
  return isas;
}

const char* name_of(CpuKernelIsa isa) {
  return isa == CpuKernelIsa::kAvx512 ? "AVX-512" : isa == CpuKernelIsa::kAvx2 ? "AVX2" : "none";
}

TEST_F(SmallGemmTest, Fp32EqualsAnFmaChainPerElementForEveryTail) {
  if (kernel_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX-512 nor AVX2: fp32 products go to at::mm_out";
  for (const CpuKernelIsa isa : kernel_isas()) {
    for (const int64_t m : {1, 5, 6, 7, 13, 64}) {
      for (const int64_t n : {1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 130}) {
        for (const int64_t k : {0, 1, 37, 256, 300, 513}) {
          for (const bool a_transposed : {false, true}) {
            const Tensor a = a_transposed ? torch::randn({k, m}).t() : torch::randn({m, k});
            const Tensor b = torch::randn({k, n + 3}).narrow(1, 1, n);  // row stride n + 3
            const Tensor frame = torch::full({m + 2, n + 5}, 7.0f);
            const Tensor view = frame.narrow(0, 1, m).narrow(1, 2, n);
            const bool add = (m + n + k) % 2 == 1;
            if (add) view.normal_();
            const Tensor start = add ? view.clone() : torch::zeros({m, n});
            small_mm_into(view, a, b, add, isa);
            ASSERT_TRUE(view.equal(fma_loop_reference(a, b, start)))
                << name_of(isa) << ": " << m << " x " << n << " x " << k << (a_transposed ? ", a transposed" : "")
                << (add ? ", adding" : "");
            Tensor outside = frame.clone();
            outside.narrow(0, 1, m).narrow(1, 2, n).fill_(7.0f);
            ASSERT_TRUE(outside.eq(7.0f).all().item<bool>())
                << name_of(isa) << ": wrote outside the view: " << m << " x " << n;
          }
        }
      }
    }
  }
}

TEST_F(SmallGemmTest, TheDefaultEntryPointsTakeThisCpusBestKernel) {
  const Tensor a = torch::randn({13, 300}), b = torch::randn({300, 40}), start = torch::randn({13, 40});
  Tensor out = torch::empty({13, 40}), expected = torch::empty({13, 40});
  small_mm_into(out, a, b);
  small_mm_into(expected, a, b, /*add=*/false, cpu_kernel_isa());
  EXPECT_TRUE(out.equal(expected));
  out.copy_(start);
  expected.copy_(start);
  small_mm_add_into(out, a, b);
  small_mm_into(expected, a, b, /*add=*/true, cpu_kernel_isa());
  EXPECT_TRUE(out.equal(expected));
}

TEST_F(SmallGemmTest, ZeroInnerSizeWritesZeros) {
  Tensor out = torch::full({3, 20}, 5.0f);
  small_mm_into(out, torch::empty({3, 0}), torch::empty({0, 20}));
  EXPECT_TRUE(out.eq(0).all().item<bool>());
}

TEST_F(SmallGemmTest, OtherDtypesAndLayoutsEqualAtMm) {
  const Tensor a = torch::randn({9, 40}, torch::kDouble), b = torch::randn({40, 70}, torch::kDouble);
  Tensor out = torch::empty({9, 70}, torch::kDouble);
  small_mm_into(out, a, b);
  EXPECT_TRUE(out.equal(torch::mm(a, b)));
  const Tensor start = torch::randn({9, 70}, torch::kDouble);
  out.copy_(start);
  small_mm_add_into(out, a, b);
  EXPECT_TRUE(out.equal(torch::addmm(start, a, b)));
  // b with a column stride (a transposed view) is not the kernel's layout in fp32 either.
  const Tensor a32 = torch::randn({9, 40}), b32_t = torch::randn({70, 40}).t();
  Tensor out32 = torch::empty({9, 70});
  small_mm_into(out32, a32, b32_t);
  EXPECT_TRUE(out32.equal(torch::mm(a32, b32_t)));
}

TEST_F(SmallGemmTest, TransposeIntoCopiesEveryElementAcrossBlockTails) {
  // bf16 and half too: under CPU autocast the attention's operands arrive in bf16. In fp32 with
  // AVX-512 or AVX2, full 16 x 16 blocks go through registers and the tails element by element.
  struct Shape {
    int64_t rows, cols;
  };
  std::vector<CpuKernelIsa> isas = kernel_isas();
  isas.push_back(CpuKernelIsa::kNone);
  for (const CpuKernelIsa isa : isas) {
    for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf}) {
      for (const Shape shape : {Shape{37, 21}, Shape{64, 128}, Shape{50, 70}, Shape{15, 33}}) {
        // A strided source (rows of a wider tensor) and a destination view into a larger one.
        const Tensor src = torch::randn({shape.rows, shape.cols + 49}, dtype).narrow(1, 3, shape.cols);
        const Tensor frame = torch::zeros({shape.cols + 4, shape.rows + 3}, dtype);
        const Tensor dst = frame.narrow(0, 2, shape.cols).narrow(1, 1, shape.rows);
        transpose_into(dst, src, isa);
        const std::string where = std::to_string(shape.rows) + " x " + std::to_string(shape.cols) + " " +
                                  c10::toString(dtype) + " " + name_of(isa);
        EXPECT_TRUE(dst.equal(src.t())) << where;
        Tensor outside = frame.clone();
        outside.narrow(0, 2, shape.cols).narrow(1, 1, shape.rows).zero_();
        EXPECT_TRUE(outside.eq(0).all().item<bool>()) << where;
      }
    }
  }
  // A transposed (column-strided) source takes the element-by-element path.
  const Tensor column_major = torch::randn({40, 48}).t();
  Tensor out = torch::empty({40, 48});
  transpose_into(out, column_major);
  EXPECT_TRUE(out.equal(column_major.t()));
}

}  // namespace
}  // namespace yuanmoe
