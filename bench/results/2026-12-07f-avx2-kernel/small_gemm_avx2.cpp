// The AVX2 small_mm kernel (src/core/small_gemm.cpp) against MKL through at::mm_out, one thread,
// on a tiny-m32 step's products in the layouts their callers pass: an expert's six (n rows,
// hidden 256, ffn 256; cycling through 32 experts' weights as the step does) and an attention
// block's two (64 query rows, S 256, head dim 128). Variants: b read in place with k in chunks of
// 256; b's panels copied first (packed) with k in chunks of 128 and of 256 (the shipped kernel).
// Each cell is the best of 15 rounds, the variants interleaved within each round: this VM's speed
// moves by 20-40 % from minute to minute, so a best-of compares the kernels, a median the minutes.
// Build and run: see README.md.
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <functional>

#include "yuanmoe/core/small_gemm.h"

namespace yuanmoe {
extern int64_t g_chunk;
extern bool g_in_place;
}  // namespace yuanmoe

using torch::Tensor;
using yuanmoe::CpuKernelIsa;

namespace {
double seconds() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
double rate(double flop, const std::function<void()>& fn) {
  const double t0 = seconds();
  fn();
  return flop / (seconds() - t0) / 1e9;
}
CpuKernelIsa g_isa = CpuKernelIsa::kNone;
void mm(Tensor out, const Tensor& a, const Tensor& b) { yuanmoe::small_mm_into(out, a, b, /*add=*/false, g_isa); }
}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);
  torch::manual_seed(0);
  const int64_t experts = 32, hidden = 256, ffn = 256;
  const int64_t n = argc > 1 ? std::atoi(argv[1]) : 64;
  const Tensor w1 = torch::randn({experts, 2 * ffn, hidden}), w2 = torch::randn({experts, hidden, ffn});
  const Tensor x = torch::randn({experts, n, hidden}), x_t = x.transpose(1, 2).contiguous();
  const Tensor h_t = torch::randn({experts, ffn, n}), h = h_t.transpose(1, 2).contiguous();
  const Tensor d_y_t = torch::randn({experts, hidden, n}), d_u_t = torch::randn({experts, 2 * ffn, n});
  Tensor u_t = torch::empty({experts, 2 * ffn, n}), y_t = torch::empty({experts, hidden, n});
  Tensor d_h_t = torch::empty({experts, ffn, n}), d_w2 = torch::empty({experts, hidden, ffn});
  Tensor d_x = torch::empty({experts, n, hidden}), d_w1 = torch::empty({experts, 2 * ffn, hidden});
  const double f_u = 2.0 * experts * n * hidden * 2 * ffn, f_y = 2.0 * experts * n * hidden * ffn;
  const int64_t seq = 256, head_dim = 128, rows = 64, reps = 200;
  const Tensor q = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim), k_t = torch::randn({head_dim, seq});
  const Tensor v = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim), p = torch::randn({rows, seq});
  Tensor scores = torch::empty({rows, seq}), o = torch::empty({rows, head_dim});
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
      {"attention q k^T", f_attention, [&] { for (int i = 0; i < reps; ++i) mm(scores, q.narrow(0, 0, rows), k_t); }},
      {"attention p v", f_attention, [&] { for (int i = 0; i < reps; ++i) mm(o, p, v); }},
  };
  struct Variant {
    CpuKernelIsa isa;
    bool in_place;
    int64_t chunk;
  };
  const std::vector<Variant> variants = {{CpuKernelIsa::kNone, false, 256},
                                         {CpuKernelIsa::kAvx2, true, 256},
                                         {CpuKernelIsa::kAvx2, false, 128},
                                         {CpuKernelIsa::kAvx2, false, 256}};
  std::printf("expert rows %lld; GFLOP/s on one thread, best of 15 interleaved rounds\n", static_cast<long long>(n));
  std::printf("%-20s %8s %14s %14s %14s\n", "product", "MKL", "AVX2 in place", "packed k 128", "packed k 256");
  for (const Product& product : products) {
    std::vector<double> best(variants.size(), 0.0);
    for (int round = 0; round < 15; ++round) {
      for (size_t i = 0; i < variants.size(); ++i) {
        g_isa = variants[i].isa;
        yuanmoe::g_in_place = variants[i].in_place;
        yuanmoe::g_chunk = variants[i].chunk;
        best[i] = std::max(best[i], rate(product.flop, product.run));
      }
    }
    std::printf("%-20s %8.1f %14.1f %14.1f %14.1f\n", product.name, best[0], best[1], best[2], best[3]);
  }
}
