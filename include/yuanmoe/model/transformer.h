// The Yuan 2.0-M32 decoder, or one pipeline stage of it. Layers live in a ModuleDict keyed by
// their global index, so a stage holding layers 12..23 has the same parameter names as the whole
// model and checkpoints load under any pipeline layout (style.md §4).
//
// Parameter names (HF name = "model." + ours, except the grouped experts, see mlp.h):
//   embed_tokens.weight                [V, D]
//   layers.{l}.input_layernorm.weight  [D]
//   layers.{l}.self_attn.{v,q,k}_proj.weight [P, D], o_proj.weight [D, P]
//   layers.{l}.self_attn.lf_gate.conv1.{weight,bias} [D/2, D, 2, 1], [D/2]
//   layers.{l}.self_attn.lf_gate.conv2.{weight,bias} [D, D/2, 2, 1], [D]
//   layers.{l}.self_attn.lf_gate.output_layernorm.weight [D]
//   layers.{l}.post_attention_layernorm.weight [D]
//   layers.{l}.mlp.gate.{query,key,value}.weight [E, D]  (attention router)
//   layers.{l}.mlp.gate.weight [E, D]                   (linear / relu / dense routers)
//   layers.{l}.mlp.experts.w1 [E, 2F, D], experts.w2 [E, D, F]
//   norm.weight [D];  lm_head.weight [V, D] only when embeddings are untied
#pragma once

#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/block.h"
#include "yuanmoe/model/norm.h"

namespace yuanmoe::model {

struct DecodeCache;  // decode.h

/// The slice of the model one pipeline stage owns: layers [first_layer, end_layer), the
/// embedding on the first stage, final norm + head on the last.
struct StageSpec {
  int64_t first_layer = 0;
  int64_t end_layer = 0;
  bool has_embedding = true;
  bool has_head = true;
  static StageSpec whole_model(int64_t num_layers) { return {0, num_layers, true, true}; }
};

struct ModelOutput {
  Tensor out;       // logits [B, S, V] on the last stage, hidden [B, S, D] otherwise
  Tensor aux_loss;  // sum of this stage's weighted router losses; undefined when none
  Tensor expert_load_LE;  // int64 [MoE layers of this stage, E] routed pairs; undefined when none
};

class TransformerImpl : public torch::nn::Module {
 public:
  TransformerImpl(const config::ModelConfig& model, const config::MoeConfig& moe, StageSpec stage);
  TransformerImpl(const config::ModelConfig& model, const config::MoeConfig& moe)
      : TransformerImpl(model, moe, StageSpec::whole_model(model.num_layers)) {}

  /// input: token ids [B, S] (int64) on the first stage, hidden [B, S, D] otherwise.
  /// position_ids_BS: RoPE positions (reset after end-of-document when packing).
  /// cache: incremental decoding (decode.h). The input then continues the cached sequence, whose
  /// absolute positions the caller passes (cache->num_tokens + i for plain decoding); the cache
  /// holds one LayerCache per layer of this stage and moves on by S tokens.
  ModelOutput forward(const Tensor& input,
                      const Tensor& position_ids_BS,
                      DecodeCache* cache = nullptr);

  /// Every MoE layer of this stage, in layer order (for load statistics and router updates).
  std::vector<Moe> moe_layers() const;

  const config::ModelConfig config;
  const StageSpec stage;
  /// Recompute every block in backward instead of storing its activations (train.recompute;
  /// set by the trainer, applies only in training mode with grad enabled). See recompute.h.
  bool recompute = false;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleDict layers{nullptr};
  std::vector<TransformerBlock> blocks;  // the same modules as `layers`, typed, in order
  RmsNorm norm{nullptr};
  torch::nn::Linear lm_head{nullptr};  // untied embeddings only
};
TORCH_MODULE(Transformer);

/// Positions 0..S-1 for every row. [B, S] int64.
Tensor default_position_ids(int64_t batch, int64_t seq, torch::Device device = torch::kCPU);

}  // namespace yuanmoe::model
