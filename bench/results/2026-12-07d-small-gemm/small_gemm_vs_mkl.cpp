// small_mm_into (src/core/small_gemm.cpp) against MKL through at::mm_out, one thread, on the
// products of a tiny-m32 step: an expert's GEMMs (n rows x 256 x 512 and the backward's), cycling
// through 32 experts' weights as the step does, and an attention block's (64 query rows, S 256,
// head dim 128), with the operand layouts each caller passes. Alternates the two, 5 rounds.
// Build: see README.md.
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <functional>

#include "yuanmoe/core/small_gemm.h"

using torch::Tensor;

namespace {
double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
void mkl_mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
double rate(double flop, const std::function<void()>& fn) {
  const double t0 = seconds();
  fn();
  return flop / (seconds() - t0) / 1e9;
}
}  // namespace

int main() {
  at::set_num_threads(1);
  torch::manual_seed(0);
  const int64_t experts = 32, hidden = 256, ffn = 256;
  const Tensor w1 = torch::randn({experts, 2 * ffn, hidden}), w2 = torch::randn({experts, hidden, ffn});
  std::printf("GFLOP/s, one thread; each cell MKL / ours\n");
  for (const int64_t n : {40, 64, 90}) {
    const Tensor x = torch::randn({experts, n, hidden}), x_t = x.transpose(1, 2).contiguous();
    const Tensor d_u = torch::randn({experts, n, 2 * ffn}), d_u_t = d_u.transpose(1, 2).contiguous();
    Tensor u = torch::empty({experts, n, 2 * ffn}), u_t = torch::empty({experts, 2 * ffn, n});
    Tensor d_x = torch::empty({experts, n, hidden}), d_w1 = torch::empty({experts, 2 * ffn, hidden});
    const double flop = 2.0 * experts * n * hidden * 2 * ffn;
    for (int round = 0; round < 5; ++round) {
      const double u_mkl = rate(flop, [&] { for (int64_t e = 0; e < experts; ++e) mkl_mm_into(u[e], x[e], w1[e].t()); });
      const double u_ours = rate(flop, [&] { for (int64_t e = 0; e < experts; ++e) yuanmoe::small_mm_into(u_t[e], w1[e], x_t[e]); });
      const double dx_mkl = rate(flop, [&] { for (int64_t e = 0; e < experts; ++e) mkl_mm_into(d_x[e], d_u[e], w1[e]); });
      const double dx_ours = rate(flop, [&] { for (int64_t e = 0; e < experts; ++e) yuanmoe::small_mm_into(d_x[e], d_u_t[e].t(), w1[e]); });
      const double dw_mkl = rate(flop, [&] { for (int64_t e = 0; e < experts; ++e) mkl_mm_into(d_w1[e], d_u[e].t(), x[e]); });
      const double dw_ours = rate(flop, [&] { for (int64_t e = 0; e < experts; ++e) yuanmoe::small_mm_into(d_w1[e], d_u_t[e], x[e]); });
      std::printf("expert rows %3lld: u = x w1^T %5.1f / %5.1f | d_x = d_u w1 %5.1f / %5.1f | d_w1 = d_u^T x %5.1f / %5.1f\n",
                  static_cast<long long>(n), u_mkl, u_ours, dx_mkl, dx_ours, dw_mkl, dw_ours);
    }
  }
  const int64_t seq = 256, head_dim = 128, rows = 64, reps = 2000;
  const Tensor q = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim);  // rows of [S, H Dh]
  const Tensor k = torch::randn({seq, head_dim}), k_t = k.t().contiguous();
  const Tensor v = torch::randn({seq, 4 * head_dim}).narrow(1, 0, head_dim), p = torch::randn({rows, seq});
  Tensor scores = torch::empty({rows, seq}), out = torch::empty({rows, head_dim}), d_v = torch::zeros({seq, head_dim});
  const double flop = 2.0 * rows * head_dim * seq * reps;
  for (int round = 0; round < 5; ++round) {
    const Tensor q_block = q.narrow(0, 0, rows);
    const double s_mkl = rate(flop, [&] { for (int i = 0; i < reps; ++i) mkl_mm_into(scores, q_block, k.t()); });
    const double s_ours = rate(flop, [&] { for (int i = 0; i < reps; ++i) yuanmoe::small_mm_into(scores, q_block, k_t); });
    const double o_mkl = rate(flop, [&] { for (int i = 0; i < reps; ++i) mkl_mm_into(out, p, v); });
    const double o_ours = rate(flop, [&] { for (int i = 0; i < reps; ++i) yuanmoe::small_mm_into(out, p, v); });
    const double dv_mkl = rate(flop, [&] { for (int i = 0; i < reps; ++i) d_v.addmm_(p.t(), q_block); });
    const double dv_ours = rate(flop, [&] { for (int i = 0; i < reps; ++i) yuanmoe::small_mm_add_into(d_v, p.t(), q_block); });
    std::printf("attention block: q k^T %5.1f / %5.1f | p v %5.1f / %5.1f | d_v += p^T d_o %5.1f / %5.1f\n", s_mkl, s_ours,
                o_mkl, o_ours, dv_mkl, dv_ours);
  }
}
