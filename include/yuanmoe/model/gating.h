// Gating and balancing functions shared by every router (reference/routers.md). Pure functions of
// fp32 router logits; no module state. Logits are [T, E].
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// Top-k selection with renormalised softmax gates (routers.md §1): the k largest of
/// logits + selection_bias are selected (the bias only selects, DeepSeek-V3 §7; pass an undefined
/// tensor for none), and the gates are softmax over the k unbiased selected logits, which equals
/// softmax-then-renormalise. For k = 1 the gate is the raw softmax probability (Switch form):
/// a renormalised single gate is always 1 and would give the router no gradient.
struct TopKGates {
  Tensor gates_TK;       // fp32, each row sums to 1 (k > 1)
  Tensor expert_ids_TK;  // int64
};
TopKGates top_k_gates(const Tensor& logits_TE, int64_t k, const Tensor& selection_bias_E);

/// ReMoE gates (routers.md §3.1): relu(logits), no normalisation. [T, E].
Tensor relu_gates(const Tensor& logits_TE);

/// Jacobs et al. 1991 gates (routers.md §4): softmax over all experts. [T, E].
Tensor dense_gates(const Tensor& logits_TE);

/// Switch load-balancing loss (routers.md §5), top-k form of Megatron:
/// E * sum_i f_i P_i with f_i = (1/(T k)) sum_t 1{i in S_t} (no gradient), P_i = mean_t softmax_i.
/// Equals 1 at perfect balance; the caller multiplies by aux_loss_coeff.
Tensor switch_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK);

/// ST-MoE router z-loss (routers.md §6): mean_t (logsumexp_j logits_tj)^2.
Tensor router_z_loss(const Tensor& logits_TE);

/// ReMoE load-balanced L1 (routers.md §3.3): (1/T) sum_t sum_e f_e R_te with
/// f_e = sg(E / (k T) * sum_t 1{R_te > 0}). The caller multiplies by the adaptive lambda.
Tensor relu_load_balanced_l1(const Tensor& gates_TE, int64_t k);

}  // namespace yuanmoe::model
