// A sum in fp64 whose additions do not wait on one another, for hand-written CPU reductions.
#pragma once

#include <cstdint>

namespace yuanmoe {

/// The sum of term(i) over [0, n) in fp64, in eight interleaved partial sums (lane j takes
/// i = j mod 8, the tail goes to lane 0), then the lanes in order: a fixed order, so the same bits
/// on every call, and one the compiler can vectorise.
template <typename Term>
double lane_sum(int64_t n, const Term& term) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
  }
  for (; i < n; ++i) lanes[0] += term(i);
  double total = 0;
  for (const double lane : lanes) total += lane;
  return total;
}

}  // namespace yuanmoe
