// The whole decoder: stable parameter names, the block formula, causality, init policy, the
// layer partition into pipeline stages, and stages that reproduce the whole model (their initial
// weights and their loaded weights) by name.
#include <map>

#include "support/fixtures.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::max_abs_diff;
using TransformerTest = testing::SeededTest;

Transformer make_model(const config::ModelConfig& model, const config::MoeConfig& moe,
                       StageSpec stage) {
  Transformer t(model, moe, stage);
  init_weights(*t, model);
  return t;
}

Transformer make_model(const config::ModelConfig& model, const config::MoeConfig& moe) {
  return make_model(model, moe, StageSpec::whole_model(model.num_layers));
}

std::vector<std::string> parameter_names(const torch::nn::Module& m) {
  std::vector<std::string> names;
  for (const auto& item : m.named_parameters()) names.push_back(item.key() + " " + c10::str(item.value().sizes()));
  return names;
}

TEST_F(TransformerTest, ParameterNamesAndShapesAreStable) {
  // Frozen: checkpoints, pipeline stages and the HF export rely on these names.
  auto model = testing::small_model_config();
  model.tie_embeddings = false;
  auto moe = testing::small_moe_config(RouterKind::kAttention);
  moe.moe_layer_freq = 2;  // layer 0 MoE, layer 1 dense
  const std::vector<std::string> expected{
      "embed_tokens.weight [97, 64]",
      "layers.0.input_layernorm.weight [64]",
      "layers.0.self_attn.v_proj.weight [128, 64]",
      "layers.0.self_attn.q_proj.weight [128, 64]",
      "layers.0.self_attn.k_proj.weight [128, 64]",
      "layers.0.self_attn.o_proj.weight [64, 128]",
      "layers.0.self_attn.lf_gate.conv1.weight [32, 64, 2, 1]",
      "layers.0.self_attn.lf_gate.conv1.bias [32]",
      "layers.0.self_attn.lf_gate.conv2.weight [64, 32, 2, 1]",
      "layers.0.self_attn.lf_gate.conv2.bias [64]",
      "layers.0.self_attn.lf_gate.output_layernorm.weight [64]",
      "layers.0.post_attention_layernorm.weight [64]",
      "layers.0.mlp.gate.query.weight [8, 64]",
      "layers.0.mlp.gate.key.weight [8, 64]",
      "layers.0.mlp.gate.value.weight [8, 64]",
      "layers.0.mlp.experts.w1 [8, 192, 64]",
      "layers.0.mlp.experts.w2 [8, 64, 96]",
      "layers.1.input_layernorm.weight [64]",
      "layers.1.self_attn.v_proj.weight [128, 64]",
      "layers.1.self_attn.q_proj.weight [128, 64]",
      "layers.1.self_attn.k_proj.weight [128, 64]",
      "layers.1.self_attn.o_proj.weight [64, 128]",
      "layers.1.self_attn.lf_gate.conv1.weight [32, 64, 2, 1]",
      "layers.1.self_attn.lf_gate.conv1.bias [32]",
      "layers.1.self_attn.lf_gate.conv2.weight [64, 32, 2, 1]",
      "layers.1.self_attn.lf_gate.conv2.bias [64]",
      "layers.1.self_attn.lf_gate.output_layernorm.weight [64]",
      "layers.1.post_attention_layernorm.weight [64]",
      "layers.1.mlp.w1.weight [384, 64]",
      "layers.1.mlp.w2.weight [64, 192]",
      "norm.weight [64]",
      "lm_head.weight [97, 64]"};
  EXPECT_EQ(parameter_names(*Transformer(model, moe)), expected);
}

TEST_F(TransformerTest, RouterParameterNamesFollowTheHfExport) {
  for (auto kind : {RouterKind::kLinear, RouterKind::kRelu, RouterKind::kDense}) {
    Transformer t(testing::small_model_config(), testing::small_moe_config(kind));
    const auto params = t->named_parameters();
    EXPECT_TRUE(params.contains("layers.1.mlp.gate.weight")) << config::to_string(kind);
    EXPECT_FALSE(params.contains("lm_head.weight"));  // tied
  }
  Transformer relu(testing::small_model_config(), testing::small_moe_config(RouterKind::kRelu));
  EXPECT_TRUE(relu->named_buffers().contains("layers.0.mlp.gate.l1_coeff"));
  Transformer linear(testing::small_model_config(), testing::small_moe_config(RouterKind::kLinear));
  EXPECT_TRUE(linear->named_buffers().contains("layers.0.mlp.gate.expert_bias"));
}

TEST_F(TransformerTest, BlockIsTwoPreNormResiduals) {
  const auto model = testing::small_model_config();
  TransformerBlock block(model, testing::small_moe_config(), 0);
  init_weights(*block, model);
  const auto x = torch::randn({2, 5, model.hidden_size});
  const auto positions = default_position_ids(2, 5);
  const auto h = x + block->self_attn(block->input_layernorm(x), positions);
  const auto expected = h + block->moe(block->post_attention_layernorm(h)).out;
  EXPECT_LT(max_abs_diff(block(x, positions).x, expected), 1e-5);
}

TEST_F(TransformerTest, LogitsAreCausalAndTiedToTheEmbedding) {
  const auto model = testing::small_model_config();
  auto t = make_model(model, testing::small_moe_config());
  t->eval();
  auto ids = torch::randint(0, model.vocab_size, {1, 12}, torch::kLong);
  const auto positions = default_position_ids(1, 12);
  const auto before = t(ids, positions).out;
  ASSERT_EQ(before.sizes(), (std::vector<int64_t>{1, 12, model.vocab_size}));
  ids[0][8] = (ids[0][8].item<int64_t>() + 1) % model.vocab_size;
  const auto after = t(ids, positions).out;
  // Earlier positions only see reordered floating point (expert GEMM blocks change size).
  EXPECT_LT(max_abs_diff(before.narrow(1, 0, 8), after.narrow(1, 0, 8)), 1e-6);
  EXPECT_GT(max_abs_diff(before.narrow(1, 8, 4), after.narrow(1, 8, 4)), 1e-3);
}

TEST_F(TransformerTest, InitFollowsThePolicy) {
  auto model = testing::small_model_config();
  model.hidden_size = 256;
  model.head_dim = 128;
  model.num_layers = 8;
  auto moe = testing::small_moe_config();
  moe.ffn_hidden_size = 256;
  auto t = make_model(model, moe, StageSpec{0, 1, true, true});
  const auto p = t->named_parameters();
  const double output_std = 0.02 / std::sqrt(16.0);
  EXPECT_NEAR(p["layers.0.self_attn.o_proj.weight"].std().item<double>(), output_std, 0.05 * output_std);
  EXPECT_NEAR(p["layers.0.mlp.experts.w2"].std().item<double>(), output_std, 0.05 * output_std);
  EXPECT_NEAR(p["layers.0.mlp.experts.w1"].std().item<double>(), 0.02, 0.001);
  EXPECT_NEAR(p["layers.0.mlp.gate.query.weight"].std().item<double>(), 0.02, 0.002);
  EXPECT_NEAR(p["embed_tokens.weight"].std().item<double>(), 0.02, 0.001);
  EXPECT_TRUE(torch::equal(p["norm.weight"], torch::ones({256})));
  EXPECT_TRUE(torch::equal(p["layers.0.self_attn.lf_gate.output_layernorm.weight"], torch::ones({256})));
  // Conv2d default: U(+-1/sqrt(in_channels * 2)).
  EXPECT_LE(p["layers.0.self_attn.lf_gate.conv1.weight"].abs().max().item<double>(), 1.0 / std::sqrt(512.0));
  EXPECT_GT(p["layers.0.self_attn.lf_gate.conv1.weight"].abs().max().item<double>(), 0.9 / std::sqrt(512.0));
  EXPECT_LE(p["layers.0.self_attn.lf_gate.conv2.bias"].abs().max().item<double>(), 1.0 / std::sqrt(256.0));
}

TEST_F(TransformerTest, SameSeedSameWeights) {
  const auto model = testing::small_model_config();
  torch::manual_seed(5);
  auto a = make_model(model, testing::small_moe_config());
  torch::manual_seed(5);
  auto b = make_model(model, testing::small_moe_config());
  const auto pb = b->named_parameters();
  for (const auto& item : a->named_parameters()) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
}

TEST_F(TransformerTest, ReportsExpertLoadPerMoeLayer) {
  auto moe = testing::small_moe_config(RouterKind::kLinear);
  auto model_config = testing::small_model_config();
  model_config.num_layers = 3;
  moe.moe_layer_freq = 2;  // layers 0 and 2 are MoE
  auto model = make_model(model_config, moe);
  const auto ids = torch::randint(97, {2, 5});
  const Tensor load_LE = model(ids, default_position_ids(2, 5)).routed_pairs_LE;
  ASSERT_EQ(load_LE.sizes(), torch::IntArrayRef({2, 8}));
  EXPECT_TRUE(torch::equal(load_LE.sum(1), torch::full({2}, 2 * 5 * 2, torch::kLong)));
}

TEST_F(TransformerTest, PipelineStagesLoadedByNameReproduceTheWholeModel) {
  auto model = testing::small_model_config();
  model.num_layers = 3;
  auto moe = testing::small_moe_config(RouterKind::kLinear);
  auto whole = make_model(model, moe);
  Transformer first(model, moe, StageSpec{0, 2, true, false});
  Transformer last(model, moe, StageSpec{2, 3, false, true});
  const auto source = whole->named_parameters();
  torch::NoGradGuard no_grad;
  for (auto* stage : {&first, &last}) {
    for (auto& item : (*stage)->named_parameters()) {
      ASSERT_TRUE(source.contains(item.key())) << item.key();
      item.value().copy_(source[item.key()]);
    }
  }
  const auto ids = torch::randint(0, model.vocab_size, {2, 6}, torch::kLong);
  const auto positions = default_position_ids(2, 6);
  const auto hidden = first(ids, positions).out;
  EXPECT_EQ(hidden.size(-1), model.hidden_size);
  EXPECT_TRUE(torch::equal(last(hidden, positions).out, whole(ids, positions).out));
}

TEST(Stages, BalancedPartitionCoversEveryLayerOnce) {
  for (int64_t layers : {1, 4, 7, 24}) {
    for (int64_t stages = 1; stages <= layers && stages <= 8; ++stages) {
      int64_t next = 0;
      for (int64_t s = 0; s < stages; ++s) {
        const StageSpec spec = balanced_stage(layers, stages, s);
        EXPECT_EQ(spec.first_layer, next);
        EXPECT_GE(spec.end_layer - spec.first_layer, layers / stages);
        EXPECT_LE(spec.end_layer - spec.first_layer, layers / stages + 1);
        EXPECT_EQ(spec.has_embedding, s == 0);
        EXPECT_EQ(spec.has_head, s == stages - 1);
        next = spec.end_layer;
      }
      EXPECT_EQ(next, layers);
    }
  }
}

TEST(Stages, FirstAndLastStageSizesCanBeSet) {
  const auto sizes = [](int64_t layers, int64_t stages, int64_t first, int64_t last) {
    std::string out;
    for (int64_t s = 0; s < stages; ++s) {
      const StageSpec spec = balanced_stage(layers, stages, s, first, last);
      out += std::to_string(spec.end_layer - spec.first_layer) + (s + 1 < stages ? " " : "");
    }
    return out;
  };
  EXPECT_EQ(sizes(4, 2, 0, 1), "3 1");  // the head's stage lighter
  EXPECT_EQ(sizes(24, 8, 2, 2), "2 4 4 3 3 3 3 2");
  EXPECT_EQ(sizes(7, 3, 0, 0), "3 2 2");
  EXPECT_EQ(sizes(7, 3, 1, 0), "1 3 3");
  EXPECT_EQ(sizes(5, 1, 0, 0), "5");
}

TEST(Stages, InitialWeightsDependOnNamesNotOnTheLayout) {
  auto model_config = testing::small_model_config();
  model_config.num_layers = 3;
  const auto moe_config = testing::small_moe_config();
  Transformer whole(model_config, moe_config);
  init_weights(*whole, model_config, 7);
  std::map<std::string, Tensor> reference;
  for (const auto& [name, t] : checkpoint::model_state(*whole)) reference[name] = t;
  for (int64_t s = 0; s < 2; ++s) {
    Transformer stage(model_config, moe_config, balanced_stage(3, 2, s));
    init_weights(*stage, model_config, 7);
    for (const auto& [name, t] : checkpoint::model_state(*stage)) {
      ASSERT_TRUE(reference.count(name)) << name;
      EXPECT_TRUE(torch::equal(t, reference[name])) << name;  // the last stage's tied copy too
    }
  }
  Transformer other_seed(model_config, moe_config);
  init_weights(*other_seed, model_config, 8);
  EXPECT_FALSE(torch::equal(other_seed->embed_tokens->weight, whole->embed_tokens->weight));
}

}  // namespace
}  // namespace yuanmoe::model
