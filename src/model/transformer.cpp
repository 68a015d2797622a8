#include "yuanmoe/model/transformer.h"

#include "yuanmoe/model/decode.h"
#include "yuanmoe/model/recompute.h"

namespace yuanmoe::model {

TransformerImpl::TransformerImpl(const config::ModelConfig& model,
                                 const config::MoeConfig& moe,
                                 StageSpec stage)
    : config(model), stage(stage) {
  if (stage.has_embedding || (stage.has_head && model.tie_embeddings)) {
    // The last stage of a tied pipeline keeps its own copy, summed with the first's (Megatron).
    embed_tokens = register_module("embed_tokens",
                                   torch::nn::Embedding(model.vocab_size, model.hidden_size));
  }
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> named_blocks;
  for (int64_t l = stage.first_layer; l < stage.end_layer; ++l) {
    blocks.push_back(TransformerBlock(model, moe, l));
    named_blocks.emplace_back(std::to_string(l), blocks.back().ptr());
  }
  layers = register_module("layers", torch::nn::ModuleDict(named_blocks));
  if (stage.has_head) {
    norm = register_module("norm", RmsNorm(model.hidden_size, model.rms_norm_eps));
    if (!model.tie_embeddings) {
      lm_head = register_module(
          "lm_head", torch::nn::Linear(
                         torch::nn::LinearOptions(model.hidden_size, model.vocab_size).bias(false)));
    }
  }
}

ModelOutput TransformerImpl::forward(const Tensor& input,
                                     const Tensor& position_ids_BS,
                                     DecodeCache* cache) {
  if (cache) {
    TORCH_CHECK(cache->layers.size() == blocks.size(), "DecodeCache has ", cache->layers.size(),
                " layers, this model (stage) has ", blocks.size(),
                "; build the cache from this model: DecodeCache(model)");
  }
  Tensor x = stage.has_embedding ? embed_tokens(input) : input;  // [B, S, D]
  Tensor aux_loss;
  std::vector<Tensor> expert_load;
  // Not with a cache: forward appends to it, so a rerun in backward would append twice.
  const bool recompute_blocks =
      recompute && is_training() && torch::GradMode::is_enabled() && cache == nullptr;
  for (size_t l = 0; l < blocks.size(); ++l) {
    BlockOutput out = recompute_blocks
                          ? recompute_block(*blocks[l], x, position_ids_BS)
                          : blocks[l](x, position_ids_BS, cache ? &cache->layers[l] : nullptr);
    x = out.x;
    if (out.aux_loss.defined()) aux_loss = aux_loss.defined() ? aux_loss + out.aux_loss : out.aux_loss;
    if (out.pairs_per_expert_E.defined()) expert_load.push_back(out.pairs_per_expert_E);
  }
  if (cache) cache->num_tokens += x.size(1);
  const Tensor expert_load_LE = expert_load.empty() ? Tensor() : torch::stack(expert_load);
  if (!stage.has_head) return {x, aux_loss, expert_load_LE};
  const Tensor h = norm(x);
  const Tensor& head_weight = config.tie_embeddings ? embed_tokens->weight : lm_head->weight;
  return {torch::matmul(h, head_weight.t()), aux_loss, expert_load_LE};  // [B, S, V]
}

std::vector<Moe> TransformerImpl::moe_layers() const {
  std::vector<Moe> out;
  for (const auto& block : blocks) {
    if (block->moe) out.push_back(block->moe);
  }
  return out;
}

Tensor default_position_ids(int64_t batch, int64_t seq, torch::Device device) {
  return torch::arange(seq, torch::dtype(torch::kLong).device(device)).unsqueeze(0).expand({batch, seq});
}

}  // namespace yuanmoe::model
