#include "yuanmoe/model/attention.h"

#include <cmath>

#include "yuanmoe/model/decode.h"
#include "yuanmoe/model/rope.h"

namespace yuanmoe::model {

namespace F = torch::nn::functional;

Tensor causal_attention(const Tensor& q_BHSDh,
                        const Tensor& k_BHSDh,
                        const Tensor& v_BHSDh,
                        double dropout_p,
                        int64_t offset) {
  const int64_t seq_q = q_BHSDh.size(2), seq_k = k_BHSDh.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q_BHSDh.size(-1)));
  Tensor scores_BHSS = torch::matmul(q_BHSDh, k_BHSDh.transpose(-2, -1));  // [B, H, Sq, Sk]
  scores_BHSS = scores_BHSS.to(at_least_fp32(scores_BHSS)) * scale;
  // Key j is in the future of query i when j > offset + i.
  const Tensor future_SS =
      torch::ones({seq_q, seq_k}, torch::dtype(torch::kBool).device(q_BHSDh.device()))
          .triu(1 + offset);
  scores_BHSS.masked_fill_(future_SS, -std::numeric_limits<float>::infinity());
  Tensor probs_BHSS = torch::softmax(scores_BHSS, -1);
  if (dropout_p > 0) probs_BHSS = F::dropout(probs_BHSS, F::DropoutFuncOptions().p(dropout_p));
  return torch::matmul(probs_BHSS.to(v_BHSDh.scalar_type()), v_BHSDh);
}

Tensor sdpa_causal_attention(const Tensor& q_BHSDh, const Tensor& k_BHSDh, const Tensor& v_BHSDh) {
  TORCH_CHECK(q_BHSDh.size(2) == k_BHSDh.size(2), "sdpa_causal_attention: whole sequences only");
  return at::scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/true);
}

AttentionImpl::AttentionImpl(const config::ModelConfig& config) : config(config) {
  const int64_t width = config.attention_width();
  const auto linear = [](int64_t in, int64_t out) {
    return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
  };
  // Registration order follows the HF state dict (v, q, k, o, lf_gate).
  v_proj = register_module("v_proj", linear(config.hidden_size, width));
  q_proj = register_module("q_proj", linear(config.hidden_size, width));
  k_proj = register_module("k_proj", linear(config.hidden_size, width));
  o_proj = register_module("o_proj", linear(width, config.hidden_size));
  if (config.lfa) {
    lf_gate = register_module("lf_gate",
                              LocalizedFiltering(config.hidden_size, config.rms_norm_eps));
  }
  inverse_frequencies_ = rope_inverse_frequencies(config.rotary_dim, config.rope_base, config.rope_tables);
}

Tensor AttentionImpl::forward(const Tensor& a_BSD,
                              const Tensor& position_ids_BS,
                              LayerCache* cache) {
  const int64_t batch = a_BSD.size(0), seq = a_BSD.size(1);
  const int64_t heads = config.num_attention_heads, head_dim = config.head_dim;

  const Tensor v_BSHDh = v_proj(a_BSD).view({batch, seq, heads, head_dim});
  const Tensor qk_input_BSD =
      config.lfa ? lf_gate(a_BSD, cache ? &cache->lfa : nullptr) : a_BSD;
  // [B, S, 2P] viewed per head as [q(Dh) | k(Dh)] (§4.1).
  const Tensor qk_BSH2 = torch::cat({q_proj(qk_input_BSD), k_proj(qk_input_BSD)}, -1)
                             .view({batch, seq, heads, 2 * head_dim});
  const RopeAngles angles = rope_angles(inverse_frequencies_, position_ids_BS, config.rope_tables);
  const Tensor q_BSHDh = apply_rope(qk_BSH2.narrow(-1, 0, head_dim), angles, config.rotary_dim);
  const Tensor k_BSHDh =
      apply_rope(qk_BSH2.narrow(-1, head_dim, head_dim), angles, config.rotary_dim);

  Tensor k_BHTDh = k_BSHDh.transpose(1, 2), v_BHTDh = v_BSHDh.transpose(1, 2);
  int64_t offset = 0;  // tokens before this chunk
  if (cache) {
    // K is cached after RoPE (yuan2-m32.md §10), so cached keys keep their own positions.
    if (cache->k_BHTDh.defined()) {
      offset = cache->k_BHTDh.size(2);
      k_BHTDh = torch::cat({cache->k_BHTDh, k_BHTDh}, 2);
      v_BHTDh = torch::cat({cache->v_BHTDh, v_BHTDh}, 2);
    }
    cache->k_BHTDh = k_BHTDh;
    cache->v_BHTDh = v_BHTDh;
  }

  const double dropout_p = is_training() ? config.attention_dropout : 0.0;
  // libtorch's fused SDPA for whole sequences: faster than materialised scores at every length
  // measured, and memory linear in S (docs/benchmarks.md). Dropout needs the probabilities and a
  // chunk after cached keys needs the offset mask: those materialise (docs/config.md).
  const Tensor q_BHSDh = q_BSHDh.transpose(1, 2);
  const bool fused = config.attention == config::AttentionKernel::kSdpa && dropout_p == 0 && offset == 0;
  const Tensor out_BHSDh = fused ? sdpa_causal_attention(q_BHSDh, k_BHTDh, v_BHTDh)
                                 : causal_attention(q_BHSDh, k_BHTDh, v_BHTDh, dropout_p, offset);
  return o_proj(out_BHSDh.transpose(1, 2).reshape({batch, seq, heads * head_dim}));
}

}  // namespace yuanmoe::model
