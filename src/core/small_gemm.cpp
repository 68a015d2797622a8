#include "yuanmoe/core/small_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define YUANMOE_SMALL_GEMM_AVX512 1
#endif

namespace yuanmoe {

#ifdef YUANMOE_SMALL_GEMM_AVX512
namespace {

#define YUANMOE_AVX512 __attribute__((target("avx512f")))

/// The register tile: MR rows of out x NV vectors of 16 columns, over the whole of k. The last
/// vector's columns are masked (`last`) so that any width runs without a scalar tail. MR x NV is
/// at most 6 x 4 = 24 accumulators, which leaves 8 of the 32 vector registers for b's row and
/// a's broadcast.
template <int MR, int NV>
YUANMOE_AVX512 inline void tile(int64_t k_size, const float* a, int64_t a_row, int64_t a_col, const float* b,
                                int64_t ldb, float* out, int64_t ldo, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
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
                              const float* b, int64_t ldb, float* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + 64 <= n_size; n += 64) tile<MR, 4>(k_size, a, a_row, a_col, b + n, ldb, out + n, ldo, 0xFFFF);
  const int64_t rest = n_size - n;
  if (rest == 0) return;
  const int64_t vectors = (rest + 15) / 16;
  const auto last = static_cast<__mmask16>((1u << (rest - 16 * (vectors - 1))) - 1);
  const float* b_n = b + n;
  float* out_n = out + n;
  switch (vectors) {
    case 1: tile<MR, 1>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last); break;
    case 2: tile<MR, 2>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last); break;
    case 3: tile<MR, 3>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last); break;
    default: tile<MR, 4>(k_size, a, a_row, a_col, b_n, ldb, out_n, ldo, last); break;
  }
}

/// out[M, N] = a[M, K] b[K, N]: a(i, k) at a[i a_row + k a_col], b and out row-major.
YUANMOE_AVX512 void small_mm_avx512(int64_t m_size, int64_t n_size, int64_t k_size, const float* a, int64_t a_row,
                                    int64_t a_col, const float* b, int64_t ldb, float* out, int64_t ldo) {
  constexpr int kRows = 6;
  int64_t i = 0;
  for (; i + kRows <= m_size; i += kRows) {
    row_block<kRows>(n_size, k_size, a + i * a_row, a_row, a_col, b, ldb, out + i * ldo, ldo);
  }
  const float* a_i = a + i * a_row;
  float* out_i = out + i * ldo;
  switch (m_size - i) {
    case 1: row_block<1>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo); break;
    case 2: row_block<2>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo); break;
    case 3: row_block<3>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo); break;
    case 4: row_block<4>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo); break;
    case 5: row_block<5>(n_size, k_size, a_i, a_row, a_col, b, ldb, out_i, ldo); break;
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

void small_mm_into(Tensor out, const Tensor& a, const Tensor& b) {
  const bool kernel = small_mm_kernel_available() && out.device().is_cpu() &&
                      a.scalar_type() == torch::kFloat && b.scalar_type() == torch::kFloat &&
                      out.scalar_type() == torch::kFloat && a.dim() == 2 && b.dim() == 2 && out.dim() == 2 &&
                      a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1) &&
                      (b.size(1) <= 1 || b.stride(1) == 1) && (out.size(1) <= 1 || out.stride(1) == 1);
#ifdef YUANMOE_SMALL_GEMM_AVX512
  if (kernel) {
    small_mm_avx512(out.size(0), out.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
                    b.const_data_ptr<float>(), b.stride(0), out.data_ptr<float>(), out.stride(0));
    return;
  }
#endif
  (void)kernel;
  at::mm_out(out, a, b);
}

}  // namespace yuanmoe
