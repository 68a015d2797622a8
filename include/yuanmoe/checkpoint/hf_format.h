// Our model <-> the Yuan2-M32-hf layout (docs/interop.md).
//
// Our parameter names already are the HF names without the "model." prefix (transformer.h),
// including the per-head interleaved q_proj/k_proj rows and the [out, in, 2, 1] LFA convs. What
// differs: experts are grouped ([E, 2F, D] / [E, D, F] here, experts.{e}.w1/w2.weight there),
// the tied lm_head is written out, the routers other than `attention` use mlp.gate.weight plus a
// "router_type" config key, and training-only router buffers stay behind (expert_bias travels
// only when bias balancing is on, as mlp.gate.expert_bias).
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/config/config.h"

namespace yuanmoe::checkpoint {

/// What config.json says about the model.
struct HfArchitecture {
  config::ModelConfig model;
  config::MoeConfig moe;
  int64_t eod_id = -1;  // eod_token_id, -1 when absent or outside the vocabulary
};

/// config.json for `run`'s model: the reference keys (docs/model.md §8.3) plus rotary_base / rope_theta,
/// rotary_dim, head_dim, tie_word_embeddings and router_type. eod_id < 0 omits the token ids.
nlohmann::ordered_json make_hf_config(const config::RunConfig& run, int64_t eod_id, c10::ScalarType dtype);

/// The architecture a config.json describes. Every missing, malformed or unsupported key is
/// reported at once (config::ConfigError naming `source`). The RoPE base comes from
/// `rope_base` if given, else rotary_base / rope_theta, else 10000 (what the HF code uses).
HfArchitecture parse_hf_config(const nlohmann::json& hf_config,
                               const std::string& source,
                               std::optional<double> rope_base = std::nullopt);

/// Our state (model_state order) -> HF names and shapes, cast to `dtype`.
NamedTensors to_hf_state(const NamedTensors& state,
                         const config::ModelConfig& model,
                         const config::MoeConfig& moe,
                         c10::ScalarType dtype);

/// HF tensors -> our state (fp32), ready for load_model_state. Every missing, unexpected or
/// mis-shaped tensor, non-float dtype and untied lm_head is listed in one std::runtime_error
/// (first line names `source`, then one problem per line).
NamedTensors from_hf_state(const NamedTensors& hf,
                           const config::ModelConfig& model,
                           const config::MoeConfig& moe,
                           const std::string& source);

}  // namespace yuanmoe::checkpoint
