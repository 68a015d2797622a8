#include "yuanmoe/model/block.h"

namespace yuanmoe::model {

bool is_moe_layer(const config::MoeConfig& moe, int64_t layer_index) {
  return layer_index % moe.moe_layer_freq == 0;
}

TransformerBlockImpl::TransformerBlockImpl(const config::ModelConfig& model,
                                           const config::MoeConfig& moe,
                                           int64_t layer_index)
    : layer_index(layer_index) {
  input_layernorm = register_module("input_layernorm", RmsNorm(model.hidden_size, model.rms_norm_eps));
  self_attn = register_module("self_attn", Attention(model));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RmsNorm(model.hidden_size, model.rms_norm_eps));
  if (is_moe_layer(moe, layer_index)) {
    this->moe = register_module("mlp", Moe(moe, model.hidden_size));
  } else {
    dense_mlp = register_module("mlp", DenseMlp(model.hidden_size, moe.dense_layer_ffn_size()));
  }
}

BlockOutput TransformerBlockImpl::forward(const Tensor& x_BSD,
                                          const Tensor& position_ids_BS,
                                          LayerCache* cache) {
  Tensor x = x_BSD + self_attn(input_layernorm(x_BSD), position_ids_BS, cache);
  const Tensor m = post_attention_layernorm(x);
  if (moe) {
    MoeOutput out = moe(m);
    return {x + out.out, out.aux_loss, out.pairs_per_expert_E};
  }
  return {x + dense_mlp(m), Tensor(), Tensor()};
}

}  // namespace yuanmoe::model
