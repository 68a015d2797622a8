// The AVX-512 small_mm kernel (src/core/small_gemm.cpp) against MKL through at::mm_out and against
// packed variants of itself, one thread, on a tiny-m32 step's products in the layouts their
// callers pass: an expert's six (n rows, hidden 256, ffn 256; cycling through 32 experts' weights
// as the step does, or as many as the second argument) and an attention block's six (64 query rows, S 256, head dim 128, q/k/v rows
// strided by 4 heads). The packed variants copy 64-column panels of b into a contiguous buffer, k
// in chunks of KC, each panel then run over all rows of a (`packed_mm` below, built from the
// kernel's own tile); each element is the same fused multiply-add chain over k, so all give the
// same bits (checked before timing). Each cell is the best of 15 rounds, the variants interleaved
// within each round. Build and run: see README.md.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <functional>

#include "yuanmoe/core/small_gemm.h"

using torch::Tensor;
using yuanmoe::CpuKernelIsa;

namespace {

#define AVX512 __attribute__((target("avx512f")))

// The tile of src/core/small_gemm.cpp, unchanged.
template <int MR, int NV>
AVX512 inline void tile(int64_t k_size, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                        float* out, int64_t ldo, __mmask16 last, bool add) {
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

template <int MR>
AVX512 void panel_rows(int64_t width, int64_t kc, const float* a, int64_t a_row, int64_t a_col, const float* panel,
                       float* out, int64_t ldo, bool add) {
  const int64_t vectors = (width + 15) / 16;
  const auto last = static_cast<__mmask16>((1u << (width - 16 * (vectors - 1))) - 1);
  switch (vectors) {
    case 1: tile<MR, 1>(kc, a, a_row, a_col, panel, 64, out, ldo, last, add); break;
    case 2: tile<MR, 2>(kc, a, a_row, a_col, panel, 64, out, ldo, last, add); break;
    case 3: tile<MR, 3>(kc, a, a_row, a_col, panel, 64, out, ldo, last, add); break;
    default: tile<MR, 4>(kc, a, a_row, a_col, panel, 64, out, ldo, last, add); break;
  }
}

int64_t g_kc = 128;

AVX512 void packed_mm(int64_t m_size, int64_t n_size, int64_t k_size, const float* a, int64_t a_row, int64_t a_col,
                      const float* b, int64_t ldb, float* out, int64_t ldo, bool add) {
  alignas(64) static thread_local float panel[256 * 64];
  for (int64_t k0 = 0; k0 < k_size || k0 == 0; k0 += g_kc) {
    const int64_t kc = std::min(g_kc, k_size - k0);
    const bool add_chunk = add || k0 > 0;
    for (int64_t n0 = 0; n0 < n_size; n0 += 64) {
      const int64_t width = std::min<int64_t>(64, n_size - n0);
      const float* b_panel = b + k0 * ldb + n0;
      if (width == 64) {
        for (int64_t k = 0; k < kc; ++k) {
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) _mm512_store_ps(panel + k * 64 + 16 * v, _mm512_loadu_ps(b_panel + k * ldb + 16 * v));
        }
      } else {
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t j = 0; j < 64; ++j) panel[k * 64 + j] = j < width ? b_panel[k * ldb + j] : 0.0f;
        }
      }
      const float* a_k = a + k0 * a_col;
      float* out_n = out + n0;
      int64_t i = 0;
      for (; i + 6 <= m_size; i += 6) panel_rows<6>(width, kc, a_k + i * a_row, a_row, a_col, panel, out_n + i * ldo, ldo, add_chunk);
      const float* a_i = a_k + i * a_row;
      float* out_i = out_n + i * ldo;
      switch (m_size - i) {
        case 1: panel_rows<1>(width, kc, a_i, a_row, a_col, panel, out_i, ldo, add_chunk); break;
        case 2: panel_rows<2>(width, kc, a_i, a_row, a_col, panel, out_i, ldo, add_chunk); break;
        case 3: panel_rows<3>(width, kc, a_i, a_row, a_col, panel, out_i, ldo, add_chunk); break;
        case 4: panel_rows<4>(width, kc, a_i, a_row, a_col, panel, out_i, ldo, add_chunk); break;
        case 5: panel_rows<5>(width, kc, a_i, a_row, a_col, panel, out_i, ldo, add_chunk); break;
        default: break;
      }
    }
  }
}

double seconds() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
double rate(double flop, const std::function<void()>& fn) {
  const double t0 = seconds();
  fn();
  return flop / (seconds() - t0) / 1e9;
}

int g_variant = 0;  // 0 MKL, 1 the kernel as shipped, 2.. packed
void mm_impl(Tensor out, const Tensor& a, const Tensor& b, bool add) {
  if (g_variant == 0) {
    if (add) out.addmm_(a, b); else at::mm_out(out, a, b);
    return;
  }
  if (g_variant == 1) return yuanmoe::small_mm_into(out, a, b, add, CpuKernelIsa::kAvx512);
  packed_mm(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), a.stride(1), b.data_ptr<float>(),
            b.stride(0), out.data_ptr<float>(), out.stride(0), add);
}
void mm(Tensor out, const Tensor& a, const Tensor& b) { mm_impl(out, a, b, false); }
void mm_add(Tensor out, const Tensor& a, const Tensor& b) { mm_impl(out, a, b, true); }
}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);
  torch::manual_seed(0);
  const int64_t n = argc > 1 ? std::atoi(argv[1]) : 64;
  const int64_t experts = argc > 2 ? std::atoi(argv[2]) : 32, hidden = 256, ffn = 256;
  const Tensor w1 = torch::randn({experts, 2 * ffn, hidden}), w2 = torch::randn({experts, hidden, ffn});
  const Tensor x = torch::randn({experts, n, hidden}), x_t = x.transpose(1, 2).contiguous();
  const Tensor h_t = torch::randn({experts, ffn, n}), h = h_t.transpose(1, 2).contiguous();
  const Tensor d_y_t = torch::randn({experts, hidden, n}), d_u_t = torch::randn({experts, 2 * ffn, n});
  Tensor u_t = torch::empty({experts, 2 * ffn, n}), y_t = torch::empty({experts, hidden, n});
  Tensor d_h_t = torch::empty({experts, ffn, n}), d_w2 = torch::empty({experts, hidden, ffn});
  Tensor d_x = torch::empty({experts, n, hidden}), d_w1 = torch::empty({experts, 2 * ffn, hidden});
  const double f_u = 2.0 * experts * n * hidden * 2 * ffn, f_y = 2.0 * experts * n * hidden * ffn;
  // Attention, one (batch row, head): q, k, v and d_out are a head's columns of [S, 4 Dh] rows.
  const int64_t seq = 256, head_dim = 128, rows = 64, reps = 200;
  const Tensor q = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim);
  const Tensor k = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim);
  const Tensor v = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim);
  const Tensor d_o = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim);
  const Tensor k_t = k.t().contiguous(), v_t = v.t().contiguous();
  const Tensor p = torch::randn({rows, seq}), d_s = torch::randn({rows, seq});
  Tensor scores = torch::empty({rows, seq}), o = torch::empty({rows, head_dim});
  Tensor d_q = torch::empty({seq, 4 * head_dim}).narrow(1, 0, head_dim);
  Tensor d_k = torch::zeros({seq, 4 * head_dim}).narrow(1, 0, head_dim), d_v = torch::zeros_like(d_k);
  const double f_attention = 2.0 * rows * head_dim * seq * reps;
  struct Product {
    const char* name;
    double flop;
    std::function<void()> run;
  };
  const std::vector<Product> products = {
      {"u^T = w1 x^T", f_u, [&] { for (int64_t e = 0; e < experts; ++e) mm(u_t[e], w1[e], x_t[e]); }},
      {"y^T = w2 h^T", f_y, [&] { for (int64_t e = 0; e < experts; ++e) mm(y_t[e], w2[e], h_t[e]); }},
      {"d_h^T = w2^T d_y^T", f_y, [&] { for (int64_t e = 0; e < experts; ++e) mm(d_h_t[e], w2[e].t(), d_y_t[e]); }},
      {"d_w2 = d_y^T h", f_y, [&] { for (int64_t e = 0; e < experts; ++e) mm(d_w2[e], d_y_t[e], h[e]); }},
      {"d_x = d_u w1", f_u, [&] { for (int64_t e = 0; e < experts; ++e) mm(d_x[e], d_u_t[e].t(), w1[e]); }},
      {"d_w1 = d_u^T x", f_u, [&] { for (int64_t e = 0; e < experts; ++e) mm(d_w1[e], d_u_t[e], x[e]); }},
      {"s = q k^T", f_attention, [&] { for (int i = 0; i < reps; ++i) mm(scores, q.narrow(0, 0, rows), k_t); }},
      {"o = p v", f_attention, [&] { for (int i = 0; i < reps; ++i) mm(o, p, v); }},
      {"d_p = d_o v^T", f_attention, [&] { for (int i = 0; i < reps; ++i) mm(scores, d_o.narrow(0, 0, rows), v_t); }},
      {"d_v += p^T d_o", f_attention, [&] { for (int i = 0; i < reps; ++i) mm_add(d_v, p.t(), d_o.narrow(0, 0, rows)); }},
      {"d_q = d_s k", f_attention, [&] { for (int i = 0; i < reps; ++i) mm(d_q.narrow(0, 0, rows), d_s, k); }},
      {"d_k += d_s^T q", f_attention, [&] { for (int i = 0; i < reps; ++i) mm_add(d_k, d_s.t(), q.narrow(0, 0, rows)); }},
  };
  const std::vector<int64_t> chunks = {0, 0, 64, 128, 256};
  // Same bits: the shipped kernel and each packed variant.
  {
    const Tensor a = torch::randn({70, 300}), b = torch::randn({300, 130});
    Tensor ref = torch::empty({70, 130}), got = torch::empty({70, 130});
    yuanmoe::small_mm_into(ref, a, b, false, CpuKernelIsa::kAvx512);
    for (int64_t kc : {64, 128, 256}) {
      g_kc = kc;
      packed_mm(70, 130, 300, a.data_ptr<float>(), 300, 1, b.data_ptr<float>(), 130, got.data_ptr<float>(), 130, false);
      if (!torch::equal(ref, got)) {
        std::printf("packed kc %lld differs from the kernel\n", static_cast<long long>(kc));
        return 1;
      }
    }
  }
  std::printf("expert rows %lld; GFLOP/s on one thread, best of 15 interleaved rounds\n", static_cast<long long>(n));
  std::printf("%-20s %8s %10s %11s %11s %11s\n", "product", "MKL", "in place", "packed 64", "packed 128", "packed 256");
  for (const Product& product : products) {
    std::vector<double> best(chunks.size(), 0.0);
    for (int round = 0; round < 15; ++round) {
      for (size_t i = 0; i < chunks.size(); ++i) {
        g_variant = static_cast<int>(i);
        g_kc = chunks[i];
        best[i] = std::max(best[i], rate(product.flop, product.run));
      }
    }
    std::printf("%-20s %8.1f %10.1f %11.1f %11.1f %11.1f\n", product.name, best[0], best[1], best[2], best[3], best[4]);
  }
}
