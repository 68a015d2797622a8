// The attention router's E x E attention over experts (docs/routers.md, "attention").
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// The attention router's logits from its projections qkv_T3E = [q | k | v] (each [T, E]):
/// r_i = sum_j softmax_j(q_i k_j) v_j per token, no 1/sqrt scaling. fp32 and fp64 on the CPU run
/// one hand-written kernel (forward and backward); other devices and dtypes the broadcast form.
Tensor expert_attention(const Tensor& qkv_T3E);

}  // namespace yuanmoe::model
