#include "yuanmoe/core/small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define YUANMOE_SMALL_GEMM_AVX512 1
#endif

namespace yuanmoe {

#ifdef YUANMOE_SMALL_GEMM_AVX512
namespace {

#define YUANMOE_AVX512 __attribute__((target("avx512f")))

/// The register tile: MR rows of out x NV vectors of 16 columns, over the whole of k, the chains
/// starting from 0 or, when adding, from out. The last vector's columns are masked (`last`) so
/// that any width runs without a scalar tail. MR x NV is at most 6 x 4 = 24 accumulators, which
/// leaves 8 of the 32 vector registers for b's row and a's broadcast.
template <int MR, int NV>
YUANMOE_AVX512 inline void tile(int64_t k_size, const float* a, int64_t a_row, int64_t a_col, const float* b,
                                int64_t ldb, float* out, int64_t ldo, __mmask16 last, bool add) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = add ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16{0xFFFF}, out + i * ldo + 16 * v)
                      : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < k_size; ++k) {
    const float* b_k = b + k * ldb;
    __m512 b_v[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      b_v[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b_k + 16 * v) : _mm512_loadu_ps(b_k + 16 * v);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 a_ik = _mm512_set1_ps(a[i * a_row + k * a_col]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a_ik, b_v[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(out + i * ldo + 16 * v, v == NV - 1 ? last : __mmask16{0xFFFF}, acc[i][v]);
    }
  }
}

/// MR rows of out, all columns: 64 at a time, then one narrower tile for the rest.
template <int MR>
YUANMOE_AVX512 void row_block(int64_t n_size, int64_t k_size, const float* a, int64_t a_row, int64_t a_col,
                              const float* b, int64_t ldb, float* out, int64_t ldo, bool add) {
  int64_t n = 0;
  for (; n + 64 <= n_size; n += 64) tile<MR, 4>(k_size, a, a_row, a_col, b + n, ldb, out + n, ldo, 0xFFFF, add);
  const int64_t rest = n_size - n;
  if (rest == 0) return;
  const int64_t vectors = (rest + 15) / 16;
  const auto last = static_cast<__mmask16>((1u << (rest - 16 * (vectors - 1))) - 1);
  const float* b_n = b + n;
  float* out_n = out + n;
  switch (vectors) {
    case 1: tile<MR, 1>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last, add); break;
    case 2: tile<MR, 2>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last, add); break;
    case 3: tile<MR, 3>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last, add); break;
    default: tile<MR, 4>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last, add); break;
  }
}

/// out[M, N] (+)= a[M, K] b[K, N]: a(i, k) at a[i a_row + k a_col], b and out row-major.
YUANMOE_AVX512 void small_mm_avx512(int64_t m_size, int64_t n_size, int64_t k_size, const float* a, int64_t a_row,
                                    int64_t a_col, const float* b, int64_t ldb, float* out, int64_t ldo, bool add) {
  constexpr int kRows = 6;
  int64_t i = 0;
  for (; i + kRows <= m_size; i += kRows) {
    row_block<kRows>(n_size, k_size, a + i * a_row, a_row, a_col, b, ldb, out + i * ldo, ldo, add);
  }
  const float* a_i = a + i * a_row;
  float* out_i = out + i * ldo;
  switch (m_size - i) {
    case 1: row_block<1>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo, add); break;
    case 2: row_block<2>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo, add); break;
    case 3: row_block<3>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo, add); break;
    case 4: row_block<4>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo, add); break;
    case 5: row_block<5>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo, add); break;
    default: break;
  }
}

}  // namespace
#endif

bool small_mm_kernel_available() {
#ifdef YUANMOE_SMALL_GEMM_AVX512
  static const bool available = __builtin_cpu_supports("avx512f") != 0;
  return available;
#else
  return false;
#endif
}

namespace {

/// Whether the kernel takes out (+)= a b: fp32 on a CPU with AVX-512, b and out with unit stride
/// along their rows.
bool kernel_applies(const Tensor& out, const Tensor& a, const Tensor& b) {
  return small_mm_kernel_available() && out.device().is_cpu() && a.scalar_type() == torch::kFloat &&
         b.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat && a.dim() == 2 && b.dim() == 2 &&
         out.dim() == 2 && a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1) &&
         (b.size(1) <= 1 || b.stride(1) == 1) && (out.size(1) <= 1 || out.stride(1) == 1);
}

void small_mm(Tensor& out, const Tensor& a, const Tensor& b, bool add) {
#ifdef YUANMOE_SMALL_GEMM_AVX512
  // Named with a and b as inputs, so that a profile counts its FLOPs as it does aten::mm's.
  RECORD_FUNCTION(add ? "yuanmoe::small_mm_add" : "yuanmoe::small_mm", std::vector<c10::IValue>({a, b}));
  small_mm_avx512(out.size(0), out.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
                  b.const_data_ptr<float>(), b.stride(0), out.data_ptr<float>(), out.stride(0), add);
#else
  (void)out, (void)a, (void)b, (void)add;
#endif
}

}  // namespace

void small_mm_into(Tensor out, const Tensor& a, const Tensor& b) {
  if (kernel_applies(out, a, b)) {
    small_mm(out, a, b, /*add=*/false);
  } else {
    at::mm_out(out, a, b);
  }
}

void transpose_into(Tensor dst, const Tensor& src) {
  TORCH_CHECK(dst.dim() == 2 && src.dim() == 2 && dst.size(0) == src.size(1) && dst.size(1) == src.size(0) &&
                  dst.scalar_type() == src.scalar_type() && dst.device().is_cpu() && src.device().is_cpu(),
              "transpose_into: expected dst [N, M] and src [M, N] of one dtype on the CPU");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "transpose_into", [&] {
    constexpr int64_t kBlock = 16;
    const int64_t rows = src.size(0), cols = src.size(1);
    const int64_t s_row = src.stride(0), s_col = src.stride(1), d_row = dst.stride(0), d_col = dst.stride(1);
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t c1 = std::min(cols, c0 + kBlock);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t r = r0; r < r1; ++r) out[c * d_row + r * d_col] = in[r * s_row + c * s_col];
        }
      }
    }
  });
}

void small_mm_add_into(Tensor out, const Tensor& a, const Tensor& b) {
  if (kernel_applies(out, a, b)) {
    small_mm(out, a, b, /*add=*/true);
  } else {
    out.addmm_(a, b);
  }
}

}  // namespace yuanmoe
