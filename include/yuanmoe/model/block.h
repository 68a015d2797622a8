// One pre-norm decoder layer (yuan2-m32.md §2):
//   x = x + self_attn(input_layernorm(x))
//   x = x + mlp(post_attention_layernorm(x))      mlp: MoE, or dense SwiGLU (moe_layer_freq)
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/attention.h"
#include "yuanmoe/model/mlp.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/model/norm.h"

namespace yuanmoe::model {

/// True when global layer `layer_index` has an MoE feed-forward block.
bool is_moe_layer(const config::MoeConfig& moe, int64_t layer_index);

struct LayerCache;  // decode.h

struct BlockOutput {
  Tensor x;         // [B, S, D]
  Tensor aux_loss;  // this layer's weighted router loss, undefined when none
  Tensor pairs_per_expert_E;  // int64 [E] routed pairs on MoE layers, undefined on dense ones
};

class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(const config::ModelConfig& model,
                       const config::MoeConfig& moe,
                       int64_t layer_index);
  /// x_BSD -> x_BSD. With a cache, x_BSD continues the sequence cached for this layer.
  BlockOutput forward(const Tensor& x_BSD,
                      const Tensor& position_ids_BS,
                      LayerCache* cache = nullptr);

  const int64_t layer_index;  // global index: the parameter names use it
  RmsNorm input_layernorm{nullptr};
  Attention self_attn{nullptr};
  RmsNorm post_attention_layernorm{nullptr};
  Moe moe{nullptr};              // registered as "mlp" on MoE layers
  DenseMlp dense_mlp{nullptr};   // registered as "mlp" on dense layers
};
TORCH_MODULE(TransformerBlock);

}  // namespace yuanmoe::model
