// Causal softmax attention on the CPU: one hand-written kernel, forward and backward.
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// Whether causal_attention_cpu takes these inputs: fp32 or fp64 on the CPU, sequences up to
/// 1,024 tokens (beyond, libtorch's flash kernel is faster), q, k and v of one dtype, q and k of
/// one shape, v of theirs but for its width, and document ids (when given) that are contiguous
/// runs in every row, as packed documents are (non-decreasing ids).
bool causal_attention_cpu_applies(const Tensor& q_BSHDh, const Tensor& k_BSHDh, const Tensor& v_BSHDh,
                                  const Tensor& document_ids_BS);

/// softmax(q k^T / sqrt(Dh)) v over whole sequences, query i seeing keys 0..i (and, with
/// document_ids_BS, only those of its own document), with q, k [B, S, H, Dh] and v [B, S, H, Dv]
/// (any strides with a unit last one). Returns [B, S, H, Dv], contiguous.
///
/// Each (batch row, head) runs on one thread in query blocks of 64 rows: a block's scores
/// against the keys it can see (one GEMM), the softmax rows in place, one GEMM for the output.
/// The backward recomputes a block's probabilities from each row's saved maximum and sum (the
/// same bits as the forward's), as flash attention does, so memory stays linear in S.
Tensor causal_attention_cpu(const Tensor& q_BSHDh, const Tensor& k_BSHDh, const Tensor& v_BSHDh,
                            const Tensor& document_ids_BS = {});

}  // namespace yuanmoe::model
