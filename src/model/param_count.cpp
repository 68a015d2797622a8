#include "yuanmoe/model/param_count.h"

#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {

ModelSize model_size(const config::ModelConfig& model, const config::MoeConfig& moe, int64_t seq_length) {
  using config::RouterKind;
  const int64_t D = model.hidden_size, P = model.attention_width(), V = model.vocab_size;
  const int64_t E = moe.num_experts, F = moe.ffn_hidden_size;

  const int64_t attention_matrices = 4 * P * D;  // v, q, k: P x D each; o: D x P
  const int64_t lfa_matrices = model.lfa ? 2 * D * D : 0;  // conv1 (D/2)x(2D), conv2 D x D
  const int64_t lfa_vectors = model.lfa ? D / 2 + D + D : 0;  // conv biases, output norm
  const int64_t layer_norms = 2 * D;
  const int64_t router = (moe.router == RouterKind::kAttention ? 3 : 1) * E * D;
  const int64_t expert = 3 * F * D;  // w1 2F x D, w2 D x F
  const int64_t active_experts = moe.router == RouterKind::kDense ? E : moe.top_k;
  const int64_t dense_ffn = 3 * moe.dense_layer_ffn_size() * D;

  ModelSize size;
  int64_t active_matmul = 0;  // weights multiplied once per token in the forward pass
  for (int64_t l = 0; l < model.num_layers; ++l) {
    const int64_t shared = attention_matrices + lfa_matrices + lfa_vectors + layer_norms;
    active_matmul += attention_matrices + lfa_matrices;
    if (is_moe_layer(moe, l)) {
      size.total_parameters += shared + router + E * expert;
      size.active_parameters += shared + router + active_experts * expert;
      active_matmul += router + active_experts * expert;
      if (moe.router == RouterKind::kAttention) size.forward_flops_per_token += 4 * E * E;
    } else {
      size.total_parameters += shared + dense_ffn;
      size.active_parameters += shared + dense_ffn;
      active_matmul += dense_ffn;
    }
  }
  const int64_t embedding = V * D, final_norm = D;
  const int64_t head = model.tie_embeddings ? 0 : V * D;
  size.total_parameters += embedding + final_norm + head;
  size.active_parameters += embedding + final_norm + head;
  active_matmul += V * D;  // the output head (tied or not); the embedding lookup is free
  size.forward_flops_per_token += 2 * active_matmul + 2 * model.num_layers * seq_length * P;
  return size;
}

}  // namespace yuanmoe::model
