#include "yuanmoe/model/param_count.h"

#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

/// One layer's parameters by role (transformer.h lists the tensors). Weight matrices and
/// vectors are kept apart because only matrices cost FLOPs.
struct LayerTerms {
  int64_t matrices = 0;      // non-expert weight matrices: attention, LFA convs, router or dense FFN
  int64_t vectors = 0;       // norms and LFA conv biases
  int64_t expert = 0;        // one expert's w1 + w2; 0 on dense layers
  int64_t num_experts = 0;   // E on MoE layers, 0 on dense layers
};

LayerTerms layer_terms(const config::ModelConfig& model, const config::MoeConfig& moe, int64_t layer_index) {
  using config::RouterKind;
  const int64_t D = model.hidden_size, P = model.attention_width();
  const int64_t E = moe.num_experts, F = moe.ffn_hidden_size;
  const int64_t attention_matrices = 4 * P * D;  // v, q, k: P x D each; o: D x P
  const int64_t lfa_matrices = model.lfa ? 2 * D * D : 0;  // conv1 (D/2)x(2D), conv2 D x D
  const int64_t lfa_vectors = model.lfa ? D / 2 + D + D : 0;  // conv biases, output norm
  const int64_t layer_norms = 2 * D;
  LayerTerms terms;
  terms.matrices = attention_matrices + lfa_matrices;
  terms.vectors = lfa_vectors + layer_norms;
  if (is_moe_layer(moe, layer_index)) {
    terms.matrices += (moe.router == RouterKind::kAttention ? 3 : 1) * E * D;  // router
    terms.expert = 3 * F * D;  // w1 2F x D, w2 D x F
    terms.num_experts = E;
  } else {
    terms.matrices += 3 * moe.dense_layer_ffn_size() * D;
  }
  return terms;
}

}  // namespace

ParameterCounts layer_parameters(const config::ModelConfig& model, const config::MoeConfig& moe,
                                 int64_t layer_index) {
  const LayerTerms terms = layer_terms(model, moe, layer_index);
  return {terms.matrices + terms.vectors, terms.num_experts * terms.expert};
}

ParameterCounts stage_parameters(const config::ModelConfig& model, const config::MoeConfig& moe,
                                 const StageSpec& stage) {
  ParameterCounts counts;
  for (int64_t l = stage.first_layer; l < stage.end_layer; ++l) {
    const ParameterCounts layer = layer_parameters(model, moe, l);
    counts.non_expert += layer.non_expert;
    counts.expert += layer.expert;
  }
  const int64_t embedding = model.vocab_size * model.hidden_size;
  if (stage.holds_embedding(model.tie_embeddings)) counts.non_expert += embedding;
  if (stage.has_head) {
    counts.non_expert += model.hidden_size;  // final norm
    if (!model.tie_embeddings) counts.non_expert += embedding;  // lm_head [V, D]
  }
  return counts;
}

ModelSize model_size(const config::ModelConfig& model, const config::MoeConfig& moe, int64_t seq_length) {
  using config::RouterKind;
  const int64_t V = model.vocab_size, D = model.hidden_size, P = model.attention_width();
  const int64_t E = moe.num_experts;

  ModelSize size;
  size.total_parameters = stage_parameters(model, moe, StageSpec::whole_model(model.num_layers)).total();
  size.active_parameters = size.total_parameters;
  int64_t active_matmul = 0;  // weights multiplied once per token in the forward pass
  for (int64_t l = 0; l < model.num_layers; ++l) {
    const LayerTerms terms = layer_terms(model, moe, l);
    const int64_t active_experts =
        terms.num_experts == 0 ? 0 : (moe.router == RouterKind::kDense ? terms.num_experts : moe.top_k);
    size.active_parameters -= (terms.num_experts - active_experts) * terms.expert;
    active_matmul += terms.matrices + active_experts * terms.expert;
    if (terms.num_experts > 0 && moe.router == RouterKind::kAttention) size.forward_flops_per_token += 4 * E * E;
  }
  active_matmul += V * D;  // the output head (tied or not); the embedding lookup is free
  size.forward_flops_per_token += 2 * active_matmul + 2 * model.num_layers * seq_length * P;
  return size;
}

}  // namespace yuanmoe::model
