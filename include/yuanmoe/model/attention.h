// Yuan 2.0 self-attention (yuan2-m32.md §2, §4): V reads the input-norm output a, Q and K read
// LFA(a); Q/K come from one per-head interleaved projection; partial RoPE; scale 1/sqrt(Dh);
// causal softmax; o_proj back to D. No biases. With a LayerCache (decode.h) a chunk attends to
// the cached keys and values of the tokens before it (incremental decoding, yuan2-m32.md §10).
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/lfa.h"

namespace yuanmoe::model {

struct LayerCache;  // decode.h

/// softmax(q k^T / sqrt(Dh) + causal) v with queries q [B, H, Sq, Dh] and keys/values k, v
/// [B, H, Sk, Dh]; query i sits at key position offset + i and sees keys 0..offset + i
/// (offset = Sk - Sq when a chunk follows cached keys, 0 for a whole sequence). Dropout on the
/// probabilities when dropout_p > 0. Probabilities in fp32. Returns [B, H, Sq, Dh].
Tensor causal_attention(const Tensor& q_BHSDh,
                        const Tensor& k_BHSDh,
                        const Tensor& v_BHSDh,
                        double dropout_p,
                        int64_t offset = 0);

/// The same without dropout through at::scaled_dot_product_attention with is_causal (libtorch's
/// fused kernels: flash attention on CPU; flash, memory-efficient or cuDNN on CUDA), for whole
/// sequences (Sq == Sk, offset 0). The kernels accumulate the softmax in fp32 whatever the inputs'
/// dtype. Returns [B, H, S, Dh] in q's dtype.
Tensor sdpa_causal_attention(const Tensor& q_BHSDh, const Tensor& k_BHSDh, const Tensor& v_BHSDh);

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const config::ModelConfig& config);
  /// a_BSD: input-norm output; position_ids_BS: RoPE positions. Returns [B, S, D].
  /// With a cache, a_BSD continues the cached sequence: its rotated keys and values are appended
  /// to the cache and its queries attend to every cached token before them.
  Tensor forward(const Tensor& a_BSD, const Tensor& position_ids_BS, LayerCache* cache = nullptr);

  const config::ModelConfig config;
  // Megatron's fused get_query_key [2P, D] is cut in two halves exactly like the HF converter:
  // q_proj holds the [q | k] rows of heads 0..H/2-1, k_proj those of heads H/2..H-1 (§4.1).
  torch::nn::Linear q_proj{nullptr};  // D -> P
  torch::nn::Linear k_proj{nullptr};  // D -> P
  torch::nn::Linear v_proj{nullptr};  // D -> P, heads contiguous
  torch::nn::Linear o_proj{nullptr};  // P -> D
  LocalizedFiltering lf_gate{nullptr};  // only with config.lfa

 private:
  Tensor inverse_frequencies_;  // [rotary_dim / 2] fp32, not a parameter (HF: non-persistent)
};
TORCH_MODULE(Attention);

}  // namespace yuanmoe::model
