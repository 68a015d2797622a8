#include "yuanmoe/checkpoint/hf_format.h"

#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::checkpoint {

namespace {

using Shape = std::vector<int64_t>;
using config::RouterKind;

/// One tensor of our state and the HF tensors it becomes: one with the same data, or (grouped
/// experts) one per expert along dim 0.
struct Slot {
  Slot(std::string ours, Shape shape, std::vector<std::string> hf)
      : ours(std::move(ours)), shape(std::move(shape)), hf(std::move(hf)) {}
  std::string ours;
  Shape shape;                // ours
  std::vector<std::string> hf;  // 1 name, or E names for grouped experts
  bool exported = true;       // false: training-only buffer, initialised on import
  bool optional_on_import = false;
  Tensor init;                // value when not exported / absent on import
};

std::string shape_string(const Shape& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  return out.str() + "]";
}

/// Every tensor of model_state(Transformer(model, moe)), with its HF form (docs/interop.md).
std::vector<Slot> layout(const config::ModelConfig& model, const config::MoeConfig& moe) {
  const int64_t D = model.hidden_size, P = model.attention_width(), E = moe.num_experts,
                F = moe.ffn_hidden_size, V = model.vocab_size;
  if (!model.lfa) {
    throw std::invalid_argument("model.lfa is false: the Yuan2-M32-hf layout always has LFA (lf_gate) weights");
  }
  std::vector<Slot> slots;
  const auto plain = [&](const std::string& ours, Shape shape) {
    slots.emplace_back(ours, std::move(shape), std::vector<std::string>{"model." + ours});
  };
  plain("embed_tokens.weight", {V, D});
  for (int64_t l = 0; l < model.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    plain(p + "input_layernorm.weight", {D});
    for (const char* proj : {"v_proj", "q_proj", "k_proj"}) plain(p + "self_attn." + proj + ".weight", {P, D});
    plain(p + "self_attn.o_proj.weight", {D, P});
    const std::string g = p + "self_attn.lf_gate.";
    plain(g + "conv1.weight", {D / 2, D, 2, 1});
    plain(g + "conv1.bias", {D / 2});
    plain(g + "conv2.weight", {D, D / 2, 2, 1});
    plain(g + "conv2.bias", {D});
    plain(g + "output_layernorm.weight", {D});
    plain(p + "post_attention_layernorm.weight", {D});
    if (!model::is_moe_layer(moe, l)) {
      throw std::invalid_argument("layer " + std::to_string(l) + " is a dense SwiGLU layer (moe.moe_layer_freq " +
                                  std::to_string(moe.moe_layer_freq) +
                                  "): the Yuan2-M32-hf layout has MoE layers only");
    }
    const std::string m = p + "mlp.";
    if (moe.router == RouterKind::kAttention) {
      for (const char* part : {"query", "key", "value"}) plain(m + "gate." + part + ".weight", {E, D});
    } else {
      plain(m + "gate.weight", {E, D});
    }
    if (config::is_top_k_router(moe.router)) {
      Slot bias{m + "gate.expert_bias", {E}, {"model." + m + "gate.expert_bias"}};
      bias.exported = moe.bias_balancing_rate > 0;
      bias.optional_on_import = true;
      bias.init = torch::zeros({E});
      slots.push_back(std::move(bias));
    }
    if (moe.router == RouterKind::kRelu) {
      Slot l1{m + "gate.l1_coeff", {}, {}};
      l1.exported = false;
      l1.init = torch::full({}, moe.relu_l1_init, torch::kFloat);
      slots.push_back(std::move(l1));
    }
    for (const auto& [w, rows, cols] : {std::tuple<std::string, int64_t, int64_t>{"w1", 2 * F, D}, {"w2", D, F}}) {
      Slot experts{m + "experts." + w, {E, rows, cols}, {}};
      for (int64_t e = 0; e < E; ++e) experts.hf.push_back("model." + m + "experts." + std::to_string(e) + "." + w + ".weight");
      slots.push_back(std::move(experts));
    }
  }
  plain("norm.weight", {D});
  if (!model.tie_embeddings) slots.emplace_back("lm_head.weight", Shape{V, D}, std::vector<std::string>{"lm_head.weight"});
  return slots;
}

Shape hf_shape(const Slot& slot) {
  return slot.hf.size() > 1 ? Shape(slot.shape.begin() + 1, slot.shape.end()) : slot.shape;
}

}  // namespace

nlohmann::ordered_json make_hf_config(const config::RunConfig& run, int64_t eod_id, c10::ScalarType dtype) {
  const config::ModelConfig& m = run.model;
  const config::MoeConfig& moe = run.moe;
  nlohmann::ordered_json c;
  c["architectures"] = {"YuanForCausalLM"};
  c["auto_map"] = {{"AutoConfig", "configuration_yuan.YuanConfig"},
                   {"AutoModelForCausalLM", "yuan_hf_model.YuanForCausalLM"}};
  c["model_type"] = "yuan";
  c["hidden_size"] = m.hidden_size;
  c["attention_projection_size"] = m.attention_width();
  c["num_hidden_layers"] = m.num_layers;
  c["num_attention_heads"] = m.num_attention_heads;
  c["intermediate_size"] = moe.ffn_hidden_size;  // dense YuanMLP only; unused by M32
  c["hidden_act"] = "silu";
  c["vocab_size"] = m.vocab_size;
  c["rms_norm_eps"] = m.rms_norm_eps;
  c["max_position_embeddings"] = m.max_seq_length;
  c["model_max_length"] = m.max_seq_length;
  c["initializer_range"] = m.init_std;
  c["dropout"] = 0;
  c["use_moe"] = true;
  c["moe_config"] = {{"moe_num_experts", moe.num_experts},
                     {"moe_top_k", moe.top_k},
                     {"ffn_hidden_size", moe.ffn_hidden_size},
                     {"gated_linear_unit", true},
                     {"norm_topk_prob", config::is_top_k_router(moe.router)}};
  c["output_router_logits"] = true;
  c["use_flash_attention"] = false;  // the eager path runs anywhere (docs/model.md §8.3)
  c["causal_mask"] = true;
  c["reset_attention_mask"] = false;
  c["reset_position_ids"] = run.data.reset_position_ids;
  c["use_loss_mask"] = false;
  if (eod_id >= 0) {
    for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id", "eod_token", "eod_token_id",
                            "mask_token_id", "sep_token_id", "sep_token"}) {
      c[key] = eod_id;
    }
  }
  c["tokenizer_class"] = "YuanTokenizer";
  c["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : "float32";
  c["use_cache"] = true;
  c["transformers_version"] = "4.30.2";
  // Beyond the published config (docs/interop.md): the HF code hard-wires base 10000 and
  // rotary dim hidden/heads; these keys let other readers (and import-hf) keep the real values.
  c["tie_word_embeddings"] = m.tie_embeddings;
  c["rotary_base"] = m.rope_base;
  c["rope_theta"] = m.rope_base;
  c["rotary_dim"] = m.rotary_dim;
  c["head_dim"] = m.head_dim;
  c["router_type"] = config::to_string(moe.router);
  // Aux-loss-free balancing biases steer selection, so a model trained with them needs them.
  if (moe.bias_balancing_rate > 0) c["router_bias_balancing_rate"] = moe.bias_balancing_rate;
  return c;
}

namespace {

/// Typed reads of an HF config.json that collect every problem instead of throwing.
/// "moe_config.KEY" reads the nested object, or the flat KEY some ports write.
class HfConfigReader {
 public:
  explicit HfConfigReader(const nlohmann::json& j)
      : j_(j), moe_(j.contains("moe_config") && j["moe_config"].is_object() ? j["moe_config"] : empty_) {}

  const nlohmann::json* find(const std::string& key) const {
    if (key.rfind("moe_config.", 0) == 0) {
      const std::string inner = key.substr(11);
      if (moe_.contains(inner)) return &moe_[inner];
      return j_.contains(inner) ? &j_[inner] : nullptr;
    }
    return j_.contains(key) ? &j_[key] : nullptr;
  }
  int64_t integer(const std::string& key, std::optional<int64_t> fallback) {
    const nlohmann::json* v = find(key);
    if (v == nullptr) {
      if (!fallback) issues.push_back({key, "missing"});
      return fallback.value_or(0);
    }
    if (!v->is_number_integer() || v->get<int64_t>() <= 0) {
      issues.push_back({key, "expected a positive integer, got " + v->dump()});
      return 0;
    }
    return v->get<int64_t>();
  }
  double number(const std::string& key, double fallback) {
    const nlohmann::json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_number() || v->get<double>() <= 0) {
      issues.push_back({key, "expected a positive number, got " + v->dump()});
      return fallback;
    }
    return v->get<double>();
  }
  bool flag(const std::string& key, bool fallback) {
    const nlohmann::json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) {
      issues.push_back({key, "expected true or false, got " + v->dump()});
      return fallback;
    }
    return v->get<bool>();
  }

  std::vector<config::ConfigIssue> issues;

 private:
  const nlohmann::json empty_ = nlohmann::json::object();
  const nlohmann::json& j_;
  const nlohmann::json& moe_;
};

config::ModelConfig read_hf_model(HfConfigReader& r, std::optional<double> rope_base) {
  config::ModelConfig m;
  m.hidden_size = r.integer("hidden_size", std::nullopt);
  m.num_layers = r.integer("num_hidden_layers", std::nullopt);
  m.num_attention_heads = r.integer("num_attention_heads", std::nullopt);
  m.vocab_size = r.integer("vocab_size", std::nullopt);
  const int64_t width = r.integer("attention_projection_size", m.hidden_size);
  const int64_t heads = std::max<int64_t>(m.num_attention_heads, 1);
  if (width % heads != 0) {
    r.issues.push_back({"attention_projection_size", "must be divisible by num_attention_heads (" +
                                                         std::to_string(heads) + "), got " + std::to_string(width)});
  }
  m.head_dim = r.integer("head_dim", width / heads);
  if (m.head_dim * heads != width) {
    r.issues.push_back({"head_dim", "must equal attention_projection_size / num_attention_heads (" +
                                        std::to_string(width / heads) + "), got " + std::to_string(m.head_dim)});
  }
  m.rotary_dim = r.integer("rotary_dim", m.hidden_size / heads);  // the HF code's choice (docs/model.md §4.2)
  m.max_seq_length = r.integer("max_position_embeddings", 4096);
  m.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  m.init_std = r.number("initializer_range", 0.02);
  m.tie_embeddings = r.flag("tie_word_embeddings", true);  // YuanConfig's default (docs/model.md §8.3)
  m.rope_base = 10000.0;  // hard-wired in the HF modelling code (docs/model.md §12.1)
  for (const char* key : {"rotary_base", "rope_theta"}) {
    if (r.find(key)) {
      m.rope_base = r.number(key, 10000.0);
      break;
    }
  }
  if (rope_base) m.rope_base = *rope_base;
  return m;
}

config::MoeConfig read_hf_moe(HfConfigReader& r) {
  config::MoeConfig moe;
  moe.num_experts = r.integer("moe_config.moe_num_experts", std::nullopt);
  moe.top_k = r.integer("moe_config.moe_top_k", std::nullopt);
  moe.ffn_hidden_size = r.integer("moe_config.ffn_hidden_size", std::nullopt);
  if (!r.flag("use_moe", true)) r.issues.push_back({"use_moe", "dense Yuan 2.0 models (YuanMLP) are not supported"});
  if (!r.flag("moe_config.gated_linear_unit", true)) {
    r.issues.push_back({"moe_config.gated_linear_unit", "only SwiGLU experts are supported"});
  }
  if (const nlohmann::json* act = r.find("hidden_act"); act && *act != "silu") {
    r.issues.push_back({"hidden_act", "only \"silu\" is supported, got " + act->dump()});
  }
  if (const nlohmann::json* router = r.find("router_type")) {
    bool known = false;
    for (const auto& [kind, name] : config::enum_names<RouterKind>()) {
      if (*router == name) {
        moe.router = kind;
        known = true;
      }
    }
    if (!known) {
      r.issues.push_back({"router_type", "expected \"attention\", \"linear\", \"relu\" or \"dense\", got " + router->dump()});
    }
  }
  if (config::is_top_k_router(moe.router) && !r.flag("moe_config.norm_topk_prob", true)) {
    r.issues.push_back({"moe_config.norm_topk_prob", "only renormalised top-k gates (true) are supported"});
  }
  moe.bias_balancing_rate = r.find("router_bias_balancing_rate") ? r.number("router_bias_balancing_rate", 0.0) : 0.0;
  return moe;
}

}  // namespace

HfArchitecture parse_hf_config(const nlohmann::json& j, const std::string& source, std::optional<double> rope_base) {
  HfConfigReader reader(j);
  HfArchitecture a;
  a.model = read_hf_model(reader, rope_base);
  a.moe = read_hf_moe(reader);
  if (const nlohmann::json* eod = reader.find("eod_token_id"); eod && eod->is_number_integer()) {
    const int64_t id = eod->get<int64_t>();
    a.eod_id = id >= 0 && id < a.model.vocab_size ? id : -1;
  }
  if (!reader.issues.empty()) throw config::ConfigError(source, reader.issues);
  return a;
}

NamedTensors to_hf_state(const NamedTensors& state,
                         const config::ModelConfig& model,
                         const config::MoeConfig& moe,
                         c10::ScalarType dtype) {
  std::map<std::string, Tensor> by_name(state.begin(), state.end());
  NamedTensors hf;
  for (const Slot& slot : layout(model, moe)) {
    const auto it = by_name.find(slot.ours);
    if (it == by_name.end()) throw std::runtime_error("model state lacks '" + slot.ours + "'");
    if (!slot.exported) continue;
    const Tensor t = it->second.detach().to(torch::kCPU, dtype);
    if (slot.hf.size() == 1) {
      hf.emplace_back(slot.hf[0], t.contiguous());
    } else {
      for (size_t e = 0; e < slot.hf.size(); ++e) hf.emplace_back(slot.hf[e], t[static_cast<int64_t>(e)].contiguous());
    }
  }
  if (model.tie_embeddings) hf.emplace_back("lm_head.weight", hf.front().second);  // tied copy (docs/model.md §8.1)
  return hf;
}

NamedTensors from_hf_state(const NamedTensors& hf,
                           const config::ModelConfig& model,
                           const config::MoeConfig& moe,
                           const std::string& source) {
  std::map<std::string, Tensor> by_name;
  std::vector<std::string> problems;
  for (const auto& [name, t] : hf) {
    if (!by_name.emplace(name, t).second) problems.push_back(name + ": appears more than once");
  }
  std::set<std::string> used;
  const auto take = [&](const std::string& name, const Shape& shape, bool optional) -> Tensor {
    const auto it = by_name.find(name);
    if (it == by_name.end()) {
      if (!optional) problems.push_back(name + ": missing (expected " + shape_string(shape) + ")");
      return Tensor();
    }
    used.insert(name);
    const Tensor& t = it->second;
    if (!t.is_floating_point()) {
      problems.push_back(name + ": dtype " + std::string(c10::toString(t.scalar_type())) + ", expected a floating type");
      return Tensor();
    }
    if (t.sizes().vec() != shape) {
      problems.push_back(name + ": shape " + shape_string(t.sizes().vec()) + ", expected " + shape_string(shape));
      return Tensor();
    }
    return t.to(torch::kFloat32);
  };

  NamedTensors state;
  for (const Slot& slot : layout(model, moe)) {
    if (slot.hf.empty()) {
      state.emplace_back(slot.ours, slot.init.clone());
      continue;
    }
    std::vector<Tensor> parts;
    for (const std::string& name : slot.hf) parts.push_back(take(name, hf_shape(slot), slot.optional_on_import));
    if (slot.hf.size() == 1) {
      state.emplace_back(slot.ours, parts[0].defined() ? parts[0] : slot.init.defined() ? slot.init.clone() : Tensor());
    } else {
      const bool complete = std::all_of(parts.begin(), parts.end(), [](const Tensor& t) { return t.defined(); });
      state.emplace_back(slot.ours, complete ? torch::stack(parts) : Tensor());
    }
  }
  if (model.tie_embeddings && by_name.count("lm_head.weight")) {
    // A tied checkpoint may carry its head copy (HF .bin does); it must be that copy.
    used.insert("lm_head.weight");
    const Tensor& head = by_name["lm_head.weight"];
    const Tensor& embed = state.front().second;
    if (embed.defined() && (head.sizes() != embed.sizes() || !torch::equal(head.to(torch::kFloat32), embed))) {
      problems.push_back("lm_head.weight: differs from model.embed_tokens.weight, but tie_word_embeddings is true");
    }
  }
  for (const auto& [name, t] : hf) {
    if (used.count(name) == 0) problems.push_back(name + ": unexpected tensor " + shape_string(t.sizes().vec()));
  }
  if (!problems.empty()) {
    std::string message = source + ": " + std::to_string(problems.size()) +
                          " problem(s) with the weights for this config.json:";
    for (const auto& problem : problems) message += "\n  " + problem;
    throw std::runtime_error(message);
  }
  return state;
}

}  // namespace yuanmoe::checkpoint
