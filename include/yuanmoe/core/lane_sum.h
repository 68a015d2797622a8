// Reductions whose additions do not wait on one another, for hand-written CPU kernels: eight
// interleaved lanes, then the lanes in order. A fixed order (the same bits on every call) and one
// the compiler can vectorise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace yuanmoe {

/// The sum of term(i) over [0, n) in Acc, in eight interleaved partial sums (lane j takes
/// i = j mod 8, the tail goes to lane 0), then the lanes in order: a fixed order, so the same bits
/// on every call, and one the compiler can vectorise.
template <typename Acc, typename Term>
Acc lane_accumulate(int64_t n, const Term& term) {
  constexpr int64_t kLanes = 8;
  Acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
  }
  for (; i < n; ++i) lanes[0] += term(i);
  Acc total = 0;
  for (const Acc lane : lanes) total += lane;
  return total;
}

/// The sum of term(i) over [0, n) in fp64.
template <typename Term>
double lane_sum(int64_t n, const Term& term) {
  return lane_accumulate<double>(n, term);
}

/// The sum of x[0, n) in scalar_t.
template <typename scalar_t>
inline scalar_t lane_total(const scalar_t* x, int64_t n) {
  return lane_accumulate<scalar_t>(n, [x](int64_t i) { return x[i]; });
}

/// sum_i a_i b_i in scalar_t.
template <typename scalar_t>
inline scalar_t lane_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  return lane_accumulate<scalar_t>(n, [a, b](int64_t i) { return a[i] * b[i]; });
}

/// The largest of x[0, n), in lanes as lane_accumulate (NaN is passed over, as by std::max).
template <typename scalar_t>
inline scalar_t lane_max(const scalar_t* x, int64_t n) {
  constexpr int64_t kLanes = 8;
  scalar_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<scalar_t>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  }
  for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
  scalar_t largest = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) largest = lanes[l] > largest ? lanes[l] : largest;
  return largest;
}

}  // namespace yuanmoe
