// transpose_into element by element (src/core/small_gemm.cpp at commit 5f4294d, built into namespace
// yuanmoe::old, declared by old_decl.h) against 16 x 16 blocks through registers, one thread,
// alternating, 5 rounds. Build: see README.md.
#include <torch/torch.h>
#include <ATen/Parallel.h>
#include <chrono>
#include <cstdio>
#include "yuanmoe/core/small_gemm.h"
#include "old_decl.h"
using torch::Tensor;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int main() {
  at::set_num_threads(1);
  const Tensor k = torch::randn({256, 512}).narrow(1, 0, 128);  // one head's keys of [S, H Dh]
  const Tensor x = torch::randn({64, 256});                       // an expert's rows
  Tensor k_t = torch::empty({128, 256}), x_t = torch::empty({256, 64});
  const int reps = 4000;
  for (int round = 0; round < 5; ++round) {
    double t0 = now(); for (int i = 0; i < reps; ++i) yuanmoe::old::transpose_into(k_t, k); const double a = (now() - t0) / reps * 1e6;
    t0 = now(); for (int i = 0; i < reps; ++i) yuanmoe::transpose_into(k_t, k); const double b = (now() - t0) / reps * 1e6;
    t0 = now(); for (int i = 0; i < reps; ++i) yuanmoe::old::transpose_into(x_t, x); const double c = (now() - t0) / reps * 1e6;
    t0 = now(); for (int i = 0; i < reps; ++i) yuanmoe::transpose_into(x_t, x); const double d = (now() - t0) / reps * 1e6;
    std::printf("keys [256, 128] of [256, 512]: element by element %.1f us, registers %.1f us | expert rows [64, 256]: %.1f us, %.1f us\n", a, b, c, d);
  }
}
