// Memory-efficient causal attention (FlashAttention-2, arXiv 2307.08691, Alg. 1 and 2, written
// with LibTorch ops): queries and keys are taken in blocks of `block_size`, the softmax is
// computed online (running max m and denominator l per query), and only the output O and the
// log-sum-exp L = m + log l are kept for backward, which recomputes each block's probabilities
// P = exp(S - L). Memory grows as O(S * block) instead of O(S^2), so a 16K-token sequence needs
// no 16K x 16K score matrix; the FLOPs are those of plain attention plus one Q K^T in backward.
// Blocks that lie wholly in the future are skipped, so causal attention does about half the
// work of the full matrix.
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// softmax(q k^T / sqrt(Dh) + causal) v, exactly as causal_attention() without dropout:
/// q [B, H, Sq, Dh], k [B, H, Sk, Dh], v [B, H, Sk, Dv] -> [B, H, Sq, Dv]. Query i sits at
/// key position offset + i. Scores, softmax and accumulation are in at least fp32 (autocast is
/// suspended inside); the output and gradients take the inputs' dtypes. Differentiable in q, k
/// and v.
Tensor blockwise_causal_attention(const Tensor& q_BHSDh,
                                  const Tensor& k_BHSDh,
                                  const Tensor& v_BHSDh,
                                  int64_t block_size,
                                  int64_t offset = 0);

}  // namespace yuanmoe::model
