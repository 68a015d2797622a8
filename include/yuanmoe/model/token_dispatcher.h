// Token dispatch (Megatron-Core's token_dispatcher): a routed micro-batch -> the rows each of
// this rank's experts computes, grouped by expert; and the experts' outputs -> the layer's
// output, gates applied. Routed (token, slot) pairs are grouped by expert with a stable sort and
// combined deterministically: every pair writes its own (token, slot) row (unique destinations,
// no atomics) and the K slots are summed in a fixed order. Dropless by default;
// moe.capacity_factor > 0 drops the overflow of each expert in batch order.
//
// LocalTokenDispatcher serves a rank that holds every expert; expert parallelism swaps in the
// all-to-all dispatcher of parallel/expert_parallel.h.
#pragma once

#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/experts.h"
#include "yuanmoe/model/router.h"

namespace yuanmoe::model {

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  /// x_TD and its routing -> the rows this rank's experts compute. host_counts: the experts need
  /// their row counts on the host (the loop kernel; reading them back waits for the device).
  virtual ExpertInput dispatch(const Tensor& x_TD, const Routing& routing, bool host_counts) = 0;
  /// The experts' outputs for the rows of the last dispatch() -> out_TD.
  virtual Tensor combine(const Tensor& ys_MD) = 0;
  /// Routed pairs per expert of the last dispatch(), before capacity drops: int64 [E], no grad.
  virtual Tensor routed_pairs_E() const = 0;
};

/// Where each routed (token, slot) pair goes: the pairs that are computed, grouped by expert.
/// Pair p is slot p % K of token p / K.
struct DispatchPlan {
  Tensor pair_ids_N;                     // int64 [N], sorted by expert, batch order inside an expert
  Tensor gates_N;                        // [N], the gate of each pair in that order
  std::vector<int64_t> rows_per_expert;  // [E] on the host when asked for (it sizes the loop's GEMMs)
  Tensor expert_offsets_E;               // int32 [E], on the device: the end row of each expert's block
  Tensor routed_pairs_E;                 // int64 [E] pairs the router asked for, before capacity drops
  int64_t tokens = 0, slots = 0;
};

/// The plan of `routing` over `tokens` tokens (moe.capacity_factor applies).
DispatchPlan plan_dispatch(const Routing& routing, int64_t tokens, const config::MoeConfig& config, bool host_counts);
/// x_TD -> the planned pairs' inputs [N, D]; backward without atomics.
Tensor gather_pairs(const Tensor& x_TD, const DispatchPlan& plan);
/// Expert outputs [N, D] -> out [T, D]: scaled by the gates, each pair written to its own
/// (token, slot) row, the K slots summed in order.
Tensor combine_pairs(const Tensor& ys_ND, const DispatchPlan& plan);

/// Every expert on this rank: the planned pairs are the experts' rows.
class LocalTokenDispatcher final : public TokenDispatcher {
 public:
  explicit LocalTokenDispatcher(const config::MoeConfig& config) : config_(config) {}
  ExpertInput dispatch(const Tensor& x_TD, const Routing& routing, bool host_counts) override;
  Tensor combine(const Tensor& ys_MD) override { return combine_pairs(ys_MD, plan_); }
  Tensor routed_pairs_E() const override { return plan_.routed_pairs_E; }

 private:
  const config::MoeConfig config_;
  DispatchPlan plan_;  // of the last dispatch, until its combine
};

}  // namespace yuanmoe::model
