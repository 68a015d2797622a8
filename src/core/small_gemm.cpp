#include "yuanmoe/core/small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define YUANMOE_SMALL_GEMM_X86 1
#endif

namespace yuanmoe {

#ifdef YUANMOE_SMALL_GEMM_X86
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

// GCC 12's unpack and shuffle intrinsics pass _mm512_undefined_ps(), which it then reports as
// used uninitialised (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

/// dst = src^T for one 16 x 16 fp32 block, both with unit column stride: 16 rows loaded, then
/// interleaved 32 bits, 64 bits and twice 128 bits at a time, 16 rows stored.
YUANMOE_AVX512 void transpose_block16(const float* src, int64_t src_row, float* dst, int64_t dst_row) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_row);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 j + c] then holds, in its 128-bit lane L, rows 4 j .. 4 j + 3 of column 4 L + c.
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512d lo_rows = _mm512_castps_pd(t[4 * j]), lo_rows_hi = _mm512_castps_pd(t[4 * j + 1]);
    const __m512d hi_rows = _mm512_castps_pd(t[4 * j + 2]), hi_rows_hi = _mm512_castps_pd(t[4 * j + 3]);
    r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo_rows, hi_rows));
    r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo_rows, hi_rows));
    r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo_rows_hi, hi_rows_hi));
    r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo_rows_hi, hi_rows_hi));
  }
  // Column 4 L + c gathers lane L of r[c], r[4 + c], r[8 + c], r[12 + c].
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 even_lanes_a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const __m512 even_lanes_b = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 odd_lanes_a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 odd_lanes_b = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    _mm512_storeu_ps(dst + c * dst_row, _mm512_shuffle_f32x4(even_lanes_a, even_lanes_b, 0x88));
    _mm512_storeu_ps(dst + (8 + c) * dst_row, _mm512_shuffle_f32x4(even_lanes_a, even_lanes_b, 0xDD));
    _mm512_storeu_ps(dst + (4 + c) * dst_row, _mm512_shuffle_f32x4(odd_lanes_a, odd_lanes_b, 0x88));
    _mm512_storeu_ps(dst + (12 + c) * dst_row, _mm512_shuffle_f32x4(odd_lanes_a, odd_lanes_b, 0xDD));
  }
}

#define YUANMOE_AVX2 __attribute__((target("avx2,fma")))

/// Rows of k one pass of the AVX2 kernel covers: a 16-column panel of 256 rows of b is 16 KiB, half
/// of a Zen 3 core's L1 (chunks of 128 rows measured slower on the products with k = 256).
constexpr int64_t kAvx2KChunk = 256;

/// The AVX2 register tile: MR rows of out x NV vectors of 8 columns, MR x NV at most 6 x 2 = 12
/// accumulators of the 16 vector registers (BLIS's Haswell sgemm tile), each element the same
/// chain of fused multiply-adds over k as in the AVX-512 tile, hence the same bits. b is a packed
/// panel (16 columns, aligned, zero-padded), so only out's columns are masked, and only in a tile
/// that needs it: AVX2's masked loads and stores are slower than plain ones.
template <int MR, int NV, bool kMasked>
YUANMOE_AVX2 inline void tile_avx2(int64_t k_size, const float* a, int64_t a_row, int64_t a_col, const float* b,
                                   int64_t ldb, float* out, int64_t ldo, __m256i last, bool add) {
  __m256 acc[MR][NV];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* out_v = out + i * ldo + 8 * v;
      acc[i][v] = !add                        ? _mm256_setzero_ps()
                  : (kMasked && v == NV - 1) ? _mm256_maskload_ps(out_v, last)
                                             : _mm256_loadu_ps(out_v);
    }
  }
  for (int64_t k = 0; k < k_size; ++k) {
    const float* b_k = b + k * ldb;
    __m256 b_v[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      b_v[v] = _mm256_load_ps(b_k + 8 * v);
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 a_ik = _mm256_broadcast_ss(a + i * a_row + k * a_col);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(a_ik, b_v[v], acc[i][v]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* out_v = out + i * ldo + 8 * v;
      if (kMasked && v == NV - 1) {
        _mm256_maskstore_ps(out_v, last, acc[i][v]);
      } else {
        _mm256_storeu_ps(out_v, acc[i][v]);
      }
    }
  }
}

/// MR rows of out x one panel of at most 16 columns.
template <int MR>
YUANMOE_AVX2 inline void panel_tile_avx2(int64_t width, int64_t k_size, const float* a, int64_t a_row,
                                         int64_t a_col, const float* b, int64_t ldb, float* out, int64_t ldo,
                                         bool add) {
  if (width == 16) return tile_avx2<MR, 2, false>(k_size, a, a_row, a_col, b, ldb, out, ldo, __m256i{}, add);
  if (width == 8) return tile_avx2<MR, 1, false>(k_size, a, a_row, a_col, b, ldb, out, ldo, __m256i{}, add);
  const int64_t in_last = width > 8 ? width - 8 : width;
  const __m256i last =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(in_last)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (width > 8) return tile_avx2<MR, 2, true>(k_size, a, a_row, a_col, b, ldb, out, ldo, last, add);
  tile_avx2<MR, 1, true>(k_size, a, a_row, a_col, b, ldb, out, ldo, last, add);
}

/// `rows` rows of out x one packed panel, 6 rows at a time and then the rest.
YUANMOE_AVX2 inline void rows_of_panel_avx2(int64_t rows, int64_t width, int64_t kc, const float* a, int64_t a_row,
                                            int64_t a_col, const float* panel, float* out, int64_t ldo, bool add) {
  constexpr int kRows = 6;
  constexpr int64_t kColumns = 16;
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows) {
    panel_tile_avx2<kRows>(width, kc, a + i * a_row, a_row, a_col, panel, kColumns, out + i * ldo, ldo, add);
  }
  const float* a_i = a + i * a_row;
  float* out_i = out + i * ldo;
  switch (rows - i) {
    case 1: panel_tile_avx2<1>(width, kc, a_i, a_row, a_col, panel, kColumns, out_i, ldo, add); break;
    case 2: panel_tile_avx2<2>(width, kc, a_i, a_row, a_col, panel, kColumns, out_i, ldo, add); break;
    case 3: panel_tile_avx2<3>(width, kc, a_i, a_row, a_col, panel, kColumns, out_i, ldo, add); break;
    case 4: panel_tile_avx2<4>(width, kc, a_i, a_row, a_col, panel, kColumns, out_i, ldo, add); break;
    case 5: panel_tile_avx2<5>(width, kc, a_i, a_row, a_col, panel, kColumns, out_i, ldo, add); break;
    default: break;
  }
}

/// out[M, N] (+)= a[M, K] b[K, N] with AVX2: panels of 16 columns, each over all rows, k in chunks.
/// Each chunk of a panel is first copied into a contiguous buffer, the last panel zero-padded: read
/// in place, 64 bytes from rows 256 bytes to 1 KiB apart (which map onto a few of L1's sets), the
/// kernel was no faster than MKL (bench/results/2026-12-07f-avx2-kernel, with and without the copy).
/// A chunk's chains continue from out where the one before stopped: the same fused multiply-adds
/// in the same order as one pass over k.
YUANMOE_AVX2 void small_mm_avx2(int64_t m_size, int64_t n_size, int64_t k_size, const float* a, int64_t a_row,
                                int64_t a_col, const float* b, int64_t ldb, float* out, int64_t ldo, bool add) {
  constexpr int64_t kColumns = 16;
  alignas(64) float panel[kAvx2KChunk * kColumns];
  // One pass when k is 0, which writes zeros (or leaves out as it is, when adding).
  for (int64_t k0 = 0; k0 < k_size || k0 == 0; k0 += kAvx2KChunk) {
    const int64_t kc = std::min(kAvx2KChunk, k_size - k0);
    const bool add_chunk = add || k0 > 0;
    for (int64_t n0 = 0; n0 < n_size; n0 += kColumns) {
      const int64_t width = std::min(kColumns, n_size - n0);
      const float* b_panel = b + k0 * ldb + n0;
      if (width == kColumns) {
        for (int64_t k = 0; k < kc; ++k) {
          _mm256_store_ps(panel + k * kColumns, _mm256_loadu_ps(b_panel + k * ldb));
          _mm256_store_ps(panel + k * kColumns + 8, _mm256_loadu_ps(b_panel + k * ldb + 8));
        }
      } else {
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t j = 0; j < kColumns; ++j) panel[k * kColumns + j] = j < width ? b_panel[k * ldb + j] : 0.0f;
        }
      }
      rows_of_panel_avx2(m_size, width, kc, a + k0 * a_col, a_row, a_col, panel, out + n0, ldo, add_chunk);
    }
  }
}

/// dst = src^T for one 8 x 8 fp32 block, both with unit column stride: interleaved 32 bits, then 64
/// bits, then the 128-bit halves exchanged.
YUANMOE_AVX2 void transpose_block8(const float* src, int64_t src_row, float* dst, int64_t dst_row) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_row);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 h + c] then holds rows 4 h .. 4 h + 3 of column c in its low half and of column 4 + c in
  // its high half.
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    r[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * dst_row, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(dst + (4 + c) * dst_row, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
}

/// A 16 x 16 block as four 8 x 8 ones.
YUANMOE_AVX2 void transpose_block16_avx2(const float* src, int64_t src_row, float* dst, int64_t dst_row) {
  for (int64_t r = 0; r < 16; r += 8) {
    for (int64_t c = 0; c < 16; c += 8) transpose_block8(src + r * src_row + c, src_row, dst + c * dst_row + r, dst_row);
  }
}

#pragma GCC diagnostic pop

}  // namespace
#endif

CpuKernelIsa cpu_kernel_isa() {
#ifdef YUANMOE_SMALL_GEMM_X86
  static const CpuKernelIsa isa = __builtin_cpu_supports("avx512f") ? CpuKernelIsa::kAvx512
                                  : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                                      ? CpuKernelIsa::kAvx2
                                      : CpuKernelIsa::kNone;
  return isa;
#else
  return CpuKernelIsa::kNone;
#endif
}

namespace {

/// Whether a kernel takes out (+)= a b: fp32 on a CPU with one, b and out with unit stride along
/// their rows.
bool kernel_applies(const Tensor& out, const Tensor& a, const Tensor& b, CpuKernelIsa isa) {
  return isa != CpuKernelIsa::kNone && out.device().is_cpu() && a.scalar_type() == torch::kFloat &&
         b.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat && a.dim() == 2 && b.dim() == 2 &&
         out.dim() == 2 && a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1) &&
         (b.size(1) <= 1 || b.stride(1) == 1) && (out.size(1) <= 1 || out.stride(1) == 1);
}

void small_mm(Tensor& out, const Tensor& a, const Tensor& b, bool add, CpuKernelIsa isa) {
#ifdef YUANMOE_SMALL_GEMM_X86
  // Named with a and b as inputs, so that a profile counts its FLOPs as it does aten::mm's.
  RECORD_FUNCTION(add ? "yuanmoe::small_mm_add" : "yuanmoe::small_mm", std::vector<c10::IValue>({a, b}));
  const auto kernel = isa == CpuKernelIsa::kAvx512 ? small_mm_avx512 : small_mm_avx2;
  kernel(out.size(0), out.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
         b.const_data_ptr<float>(), b.stride(0), out.data_ptr<float>(), out.stride(0), add);
#else
  (void)out, (void)a, (void)b, (void)add, (void)isa;
#endif
}

void check_supported(CpuKernelIsa isa) {
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(cpu_kernel_isa()),
              "small_gemm: this CPU does not run the requested instruction set's kernels");
}

}  // namespace

void small_mm_into(Tensor out, const Tensor& a, const Tensor& b, bool add, CpuKernelIsa isa) {
  check_supported(isa);
  if (kernel_applies(out, a, b, isa)) {
    small_mm(out, a, b, add, isa);
  } else if (add) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void small_mm_into(Tensor out, const Tensor& a, const Tensor& b) {
  small_mm_into(std::move(out), a, b, /*add=*/false, cpu_kernel_isa());
}

void small_mm_add_into(Tensor out, const Tensor& a, const Tensor& b) {
  small_mm_into(std::move(out), a, b, /*add=*/true, cpu_kernel_isa());
}

void transpose_into(Tensor dst, const Tensor& src, CpuKernelIsa isa) {
  check_supported(isa);
  TORCH_CHECK(dst.dim() == 2 && src.dim() == 2 && dst.size(0) == src.size(1) && dst.size(1) == src.size(0) &&
                  dst.scalar_type() == src.scalar_type() && dst.device().is_cpu() && src.device().is_cpu(),
              "transpose_into: expected dst [N, M] and src [M, N] of one dtype on the CPU");
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t s_row = src.stride(0), s_col = src.stride(1), d_row = dst.stride(0), d_col = dst.stride(1);
  constexpr int64_t kBlock = 16;
  // Full 16 x 16 fp32 blocks between unit-stride rows go through registers; the rest element by element.
  const bool in_registers =
      isa != CpuKernelIsa::kNone && src.scalar_type() == torch::kFloat && s_col == 1 && d_col == 1;
  const int64_t register_rows = in_registers ? rows / kBlock * kBlock : 0;
  const int64_t register_cols = in_registers ? cols / kBlock * kBlock : 0;
#ifdef YUANMOE_SMALL_GEMM_X86
  if (register_rows > 0 && register_cols > 0) {
    const auto block = isa == CpuKernelIsa::kAvx512 ? transpose_block16 : transpose_block16_avx2;
    const float* in = src.const_data_ptr<float>();
    float* out = dst.data_ptr<float>();
    for (int64_t r0 = 0; r0 < register_rows; r0 += kBlock) {
      for (int64_t c0 = 0; c0 < register_cols; c0 += kBlock) {
        block(in + r0 * s_row + c0, s_row, out + c0 * d_row + r0, d_row);
      }
    }
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "transpose_into", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock);
      // Columns the register blocks covered are skipped in their rows.
      const int64_t first_col = r1 <= register_rows ? register_cols : 0;
      for (int64_t c0 = first_col; c0 < cols; c0 += kBlock) {
        const int64_t c1 = std::min(cols, c0 + kBlock);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t r = r0; r < r1; ++r) out[c * d_row + r * d_col] = in[r * s_row + c * s_col];
        }
      }
    }
  });
}

void transpose_into(Tensor dst, const Tensor& src) { transpose_into(std::move(dst), src, cpu_kernel_isa()); }

}  // namespace yuanmoe
