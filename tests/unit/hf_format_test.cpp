// The HF mapping in both directions, for every router (the Python parity test covers the two
// routers the reference implements), plus the sharded writer and byte sizes.
#include "support/fixtures.h"
#include "support/temp_dir.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/checkpoint/hf_files.h"
#include "yuanmoe/checkpoint/hf_format.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::checkpoint {
namespace {

using testing::SeededTestWithParam;

config::RunConfig run_config(config::RouterKind router) {
  config::RunConfig run;
  run.model = testing::small_model_config();
  run.model.rope_base = 40890;
  run.model.rotary_dim = 8;  // not the HF default hidden/heads = 16: must survive via config.json
  run.moe = testing::small_moe_config(router);
  if (router == config::RouterKind::kAttention) run.moe.bias_balancing_rate = 1e-3;
  return run;
}

Tensor find(const NamedTensors& tensors, const std::string& name) {
  for (const auto& [n, t] : tensors) {
    if (n == name) return t;
  }
  return Tensor();
}

class HfFormatTest : public SeededTestWithParam<config::RouterKind> {};

TEST_P(HfFormatTest, ExportImportIsTheIdentity) {
  const config::RunConfig run = run_config(GetParam());
  model::Transformer model(run.model, run.moe);
  model::init_weights(*model, run.model);
  // A trained expert bias travels when balancing is on (l1_coeff is training state and stays).
  if (run.moe.bias_balancing_rate > 0) {
    for (auto& buffer : model->named_buffers()) {
      if (buffer.key().find("expert_bias") != std::string::npos) buffer.value().uniform_(-1.0, 1.0);
    }
  }
  const NamedTensors ours = model_state(*model);
  const NamedTensors hf = to_hf_state(ours, run.model, run.moe, torch::kFloat32);

  // Names and shapes of docs/model.md §8.1: experts split with the gate rows first, tied head copied.
  const int64_t E = run.moe.num_experts, F = run.moe.ffn_hidden_size, D = run.model.hidden_size;
  const Tensor w1_e3 = find(hf, "model.layers.1.mlp.experts.3.w1.weight");
  ASSERT_TRUE(w1_e3.defined());
  EXPECT_EQ(w1_e3.sizes().vec(), (std::vector<int64_t>{2 * F, D}));
  EXPECT_TRUE(torch::equal(w1_e3, find(ours, "layers.1.mlp.experts.w1")[3]));
  EXPECT_TRUE(torch::equal(find(hf, "lm_head.weight"), find(hf, "model.embed_tokens.weight")));
  EXPECT_EQ(find(hf, "model.layers.0.self_attn.lf_gate.conv1.weight").sizes().vec(),
            (std::vector<int64_t>{D / 2, D, 2, 1}));
  const bool attention = GetParam() == config::RouterKind::kAttention;
  EXPECT_EQ(find(hf, "model.layers.0.mlp.gate.query.weight").defined(), attention);
  EXPECT_EQ(find(hf, "model.layers.0.mlp.gate.weight").defined(), !attention);
  EXPECT_EQ(find(hf, "model.layers.0.mlp.gate.expert_bias").defined(), attention);
  EXPECT_FALSE(find(hf, "model.layers.0.mlp.gate.l1_coeff").defined());
  EXPECT_EQ(find(hf, "model.layers.0.mlp.experts.w1").defined(), false);
  EXPECT_TRUE(find(hf, "model.layers.0.mlp.experts." + std::to_string(E - 1) + ".w2.weight").defined());

  // config.json -> architecture gives back every architecture key.
  const HfArchitecture arch = parse_hf_config(nlohmann::json::parse(make_hf_config(run, 4, torch::kFloat32).dump()), "c");
  EXPECT_EQ(config::to_json(config::RunConfig{arch.model, arch.moe, run.train, run.data, run.parallel, run.checkpoint, run.log}),
            config::to_json(run));
  EXPECT_EQ(arch.eod_id, 4);

  const NamedTensors back = from_hf_state(hf, arch.model, arch.moe, "test");
  ASSERT_EQ(back.size(), ours.size());
  for (const auto& [name, t] : ours) {
    const Tensor imported = find(back, name);
    ASSERT_TRUE(imported.defined()) << name;
    EXPECT_TRUE(torch::equal(imported, t)) << name;
  }
  model::Transformer reloaded(arch.model, arch.moe);
  load_model_state(*reloaded, back, "test");
}

INSTANTIATE_TEST_SUITE_P(AllRouters, HfFormatTest, ::testing::ValuesIn(testing::all_router_kinds()),
                         [](const auto& info) { return config::to_string(info.param); });

TEST(HfFormat, ImportListsEveryProblem) {
  const config::RunConfig run = run_config(config::RouterKind::kLinear);
  model::Transformer model(run.model, run.moe);
  NamedTensors hf = to_hf_state(model_state(*model), run.model, run.moe, torch::kBFloat16);
  hf.erase(hf.begin() + 1);                                       // a missing norm
  hf.emplace_back("model.layers.0.mlp.gate.extra", torch::zeros({2}));  // an extra tensor
  for (auto& [name, t] : hf) {
    if (name == "model.norm.weight") t = torch::zeros({3});       // a wrong shape
    if (name == "lm_head.weight") t = t + 1;                       // an untied head
  }
  try {
    from_hf_state(hf, run.model, run.moe, "dir");
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("dir: 4 problem(s)"), std::string::npos) << message;
    EXPECT_NE(message.find("model.layers.0.input_layernorm.weight: missing (expected [64])"), std::string::npos) << message;
    EXPECT_NE(message.find("model.layers.0.mlp.gate.extra: unexpected tensor [2]"), std::string::npos) << message;
    EXPECT_NE(message.find("model.norm.weight: shape [3], expected [64]"), std::string::npos) << message;
    EXPECT_NE(message.find("lm_head.weight: differs from model.embed_tokens.weight"), std::string::npos) << message;
  }
}

TEST(HfFormat, ConfigProblemsAreListedTogether) {
  const nlohmann::json bad = {{"hidden_size", "64"}, {"num_attention_heads", 4}, {"vocab_size", 97},
                              {"moe_config", {{"moe_top_k", 2}, {"gated_linear_unit", false}}},
                              {"router_type", "hash"}};
  try {
    parse_hf_config(bad, "config.json");
    FAIL() << "expected an error";
  } catch (const config::ConfigError& e) {
    const std::string message = e.what();
    for (const char* expected : {"hidden_size: expected a positive integer", "num_hidden_layers: missing",
                                 "moe_config.moe_num_experts: missing", "moe_config.ffn_hidden_size: missing",
                                 "gated_linear_unit: only SwiGLU", "router_type: expected"}) {
      EXPECT_NE(message.find(expected), std::string::npos) << expected << "\n" << message;
    }
  }
}

TEST(HfFormat, ModelsTheLayoutCannotHoldAreRefused) {
  config::RunConfig run = run_config(config::RouterKind::kLinear);
  run.model.lfa = false;
  EXPECT_THROW(to_hf_state({}, run.model, run.moe, torch::kFloat32), std::invalid_argument);
  run.model.lfa = true;
  run.moe.moe_layer_freq = 2;  // layer 1 is dense SwiGLU
  try {
    to_hf_state({}, run.model, run.moe, torch::kFloat32);
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1 is a dense SwiGLU layer"), std::string::npos) << e.what();
  }
}

TEST(HfFiles, ShardsAndIndexRoundTrip) {
  testing::TempDir dir;
  NamedTensors tensors;
  for (int i = 0; i < 5; ++i) tensors.emplace_back("t" + std::to_string(i), torch::randn({100}));  // 400 B each
  const auto files = write_hf_weights(dir.path(), tensors, 1000);
  EXPECT_EQ(files, (std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                             "model-00003-of-00003.safetensors", "model.safetensors.index.json"}));
  const NamedTensors back = read_hf_weights(dir.path());
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) EXPECT_TRUE(torch::equal(find(back, name), t)) << name;

  testing::TempDir single;
  EXPECT_EQ(write_hf_weights(single.path(), tensors, 1 << 20), std::vector<std::string>{"model.safetensors"});
}

TEST(HfFiles, ByteSizes) {
  EXPECT_EQ(parse_byte_size("5GB"), 5'000'000'000ull);
  EXPECT_EQ(parse_byte_size("200kb"), 200'000ull);
  EXPECT_EQ(parse_byte_size("2GiB"), 2ull << 30);
  EXPECT_EQ(parse_byte_size("123"), 123ull);
  EXPECT_THROW(parse_byte_size("GB"), std::invalid_argument);
  EXPECT_THROW(parse_byte_size("5XB"), std::invalid_argument);
  EXPECT_THROW(parse_byte_size("0"), std::invalid_argument);
}

}  // namespace
}  // namespace yuanmoe::checkpoint
