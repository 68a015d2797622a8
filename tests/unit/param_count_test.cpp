// The parameter-count formula against the published numbers and against instantiated models.
#include "support/fixtures.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/model/param_count.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;

TEST(ParamCountTest, Yuan2M32PublishedCounts) {
  const auto run = config::load_config("configs/yuan2-m32.json");
  const ModelSize size = model_size(run.model, run.moe, run.train.seq_length);
  EXPECT_EQ(size.total_parameters, 39'942'842'368);
  EXPECT_EQ(size.active_parameters, 3'704'055'808);
  // Forward FLOPs: 2 per weight of every active matrix (vectors excluded, head counted once),
  // 2 S P per layer of causal attention, 4 E^2 per attention router (arXiv 2405.17976: ~7.4 GFLOPs + attention).
  const int64_t L = 24, D = 2048, S = 4096, P = 4096, E = 32;
  const int64_t vectors = L * (2 * D + D / 2 + D + D) + D;
  EXPECT_EQ(size.forward_flops_per_token, 2 * (size.active_parameters - vectors) + 2 * L * S * P + 4 * E * E * L);
}

/// Total from the instantiated module; active = everything but the experts, plus the active
/// share of each MoE layer's experts.
std::pair<int64_t, int64_t> instantiated_counts(const config::ModelConfig& model, const config::MoeConfig& moe) {
  Transformer t(model, moe);
  int64_t total = 0, active = 0;
  const int64_t active_experts = moe.router == RouterKind::kDense ? moe.num_experts : moe.top_k;
  for (const auto& item : t->named_parameters()) {
    const int64_t n = item.value().numel();
    total += n;
    const bool expert = item.key().find(".experts.") != std::string::npos;
    active += expert ? n / moe.num_experts * active_experts : n;
  }
  return {total, active};
}

struct SizeCase {
  const char* name;
  bool tie;
  bool lfa;
  int64_t moe_layer_freq;
  RouterKind router;
};

class ParamCountCaseTest : public ::testing::TestWithParam<SizeCase> {};

TEST_P(ParamCountCaseTest, FormulaEqualsInstantiatedModel) {
  const SizeCase c = GetParam();
  auto model = testing::small_model_config();
  model.num_layers = 3;
  model.tie_embeddings = c.tie;
  model.lfa = c.lfa;
  auto moe = testing::small_moe_config(c.router);
  moe.moe_layer_freq = c.moe_layer_freq;
  const ModelSize size = model_size(model, moe, 16);
  const auto [total, active] = instantiated_counts(model, moe);
  EXPECT_EQ(size.total_parameters, total);
  EXPECT_EQ(size.active_parameters, active);
}

INSTANTIATE_TEST_SUITE_P(
    Configs, ParamCountCaseTest,
    ::testing::Values(SizeCase{"tied_attention", true, true, 1, RouterKind::kAttention},
                      SizeCase{"untied_linear", false, true, 1, RouterKind::kLinear},
                      SizeCase{"no_lfa_relu", true, false, 1, RouterKind::kRelu},
                      SizeCase{"dense_router", true, true, 1, RouterKind::kDense},
                      SizeCase{"every_other_layer_moe", false, true, 2, RouterKind::kAttention}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace yuanmoe::model
