#include <chrono>
#include <cstdio>
#include <vector>
#include <random>
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*, const float*, const int*, const float*, float*, const int*);
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
int mkl_set_num_threads_local(int);
}
int main() {

  const int E = 32, M = 64, K = 256, N = 512;
  std::mt19937 g(1); std::normal_distribution<float> nd;
  std::vector<std::vector<float>> A(E, std::vector<float>(M * K)), B(E, std::vector<float>(K * N)), C(E, std::vector<float>(M * N));
  for (auto& a : A) for (auto& x : a) x = nd(g);
  for (auto& b : B) for (auto& x : b) x = nd(g);
  std::vector<float> junk(64 << 20 >> 2);
  const size_t psize = cblas_sgemm_pack_get_size(162, M, N, K);
  std::vector<std::vector<float>> P(E, std::vector<float>(psize / 4 + 16));
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  const float one = 1, zero = 0;
  const double flop = 2.0 * M * N * K * E;
  for (int rep = 0; rep < 4; ++rep) {
    for (auto& x : junk) x += 1;  // evict
    auto t0 = now();
    for (int e = 0; e < E; ++e) sgemm_("N", "N", &N, &M, &K, &one, B[e].data(), &N, A[e].data(), &K, &zero, C[e].data(), &N);
    auto t1 = now();
    for (int e = 0; e < E; ++e) sgemm_("N", "N", &N, &M, &K, &one, B[e].data(), &N, A[e].data(), &K, &zero, C[e].data(), &N);
    auto t2 = now();
    for (auto& x : junk) x += 1;
    auto t3 = now();
    for (int e = 0; e < E; ++e) cblas_sgemm_pack(101, 162, 111, M, N, K, 1.0f, B[e].data(), N, P[e].data());
    auto t4 = now();
    for (auto& x : junk) x += 1;
    auto t5 = now();
    for (int e = 0; e < E; ++e) cblas_sgemm_compute(101, 111, 151, M, N, K, A[e].data(), K, P[e].data(), N, 0.0f, C[e].data(), N);
    auto t6 = now();
    printf("sgemm cold %.1f GFLOP/s, warm %.1f | pack %.2f ms for 32 | packed compute cold %.1f GFLOP/s\n",
           flop / ms(t0, t1) / 1e6, flop / ms(t1, t2) / 1e6, ms(t3, t4), flop / ms(t5, t6) / 1e6);
  }
}
