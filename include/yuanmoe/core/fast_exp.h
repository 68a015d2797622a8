// exp for softmax rows in hand-written CPU kernels, and the AVX2 build of their loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace yuanmoe {

/// Marks a loop function to be built for AVX2 and for the baseline, picked by the CPU at load
/// time (target_clones; AVX2 runs the kernels' loops about twice as fast as SSE2). Both give the
/// same bits when the loops vectorise across independent values, which keeps each value's
/// operations and their order as written: neither target has FMA instructions to contract them
/// into. Files that use it build with -fno-trapping-math (src/CMakeLists.txt), or the compiler
/// keeps the compares of exp_of_nonpositive as branches and vectorises nothing.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define YUANMOE_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define YUANMOE_AVX2_CLONE
#endif

/// exp(x) in fp32 for x <= 0 as plain arithmetic the compiler vectorises (ATen's vectorised exp is
/// a call per tensor, too dear per token): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts),
/// e^r by Cephes' expf polynomial, 2^n through the exponent bits. Within 1.5 ulp (1.3 measured
/// against std::exp over [-87, 0]). Below -87.3, where 2^n would leave the normal range, it
/// returns 0, as exp underflows.
inline float exp_of_nonpositive(float x) {
  const float clamped = x < -87.3f ? -87.3f : x;  // NaN stays NaN
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof two_to_n);
  return x < -87.3f ? 0.0f : p * two_to_n;
}

/// fp64 (the kernels' gradient checks) takes libm's exp.
inline double exp_of_nonpositive(double x) { return std::exp(x); }

}  // namespace yuanmoe
