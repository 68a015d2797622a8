// Double-precision gradient checks: router + MoE for every router (with its balancing terms),
// and the whole decoder with LFA, attention and the attention router.
#include "support/fixtures.h"
#include "support/gradcheck.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using config::RouterKind;
using testing::NamedTensor;

class MoeGradientTest : public testing::SeededTestWithParam<RouterKind> {};

TEST_P(MoeGradientTest, RouterAndExpertGradientsMatchFiniteDifferences) {
  auto config = testing::small_moe_config(GetParam());
  config.aux_loss_coeff = 0.1;  // exercised by the top-k routers
  config.z_loss_coeff = 0.01;
  Moe moe(config, 12);
  moe->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : moe->parameters()) p.normal_(0.0, 0.4);
    if (auto* relu = dynamic_cast<ReluRouterImpl*>(moe->gate.get())) relu->l1_coeff.fill_(0.05);
  }
  const auto x = torch::randn({6, 12}, torch::kDouble).requires_grad_(true);
  const auto projection = torch::randn({6, 12}, torch::kDouble);
  const auto loss = [&] {
    const MoeOutput out = moe(x);
    auto total = (out.out * projection).sum();
    return out.aux_loss.defined() ? total + out.aux_loss : total;
  };
  std::vector<NamedTensor> inputs{{"x", x}};
  for (const auto& item : moe->named_parameters()) inputs.push_back({item.key(), item.value()});
  testing::expect_gradients_match(loss, inputs);
}

INSTANTIATE_TEST_SUITE_P(AllRouters, MoeGradientTest, ::testing::ValuesIn(testing::all_router_kinds()),
                         [](const auto& info) { return config::to_string(info.param); });

TEST(DecoderGradientTest, WholeModelGradientsMatchFiniteDifferences) {
  torch::manual_seed(0);
  auto model = testing::small_model_config();
  model.hidden_size = 16;
  model.num_attention_heads = 2;
  model.head_dim = 16;
  model.rotary_dim = 8;
  model.vocab_size = 11;
  auto moe = testing::small_moe_config(RouterKind::kAttention);
  moe.num_experts = 4;
  moe.ffn_hidden_size = 8;
  Transformer t(model, moe);
  init_weights(*t, model);
  t->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;  // larger weights than init so that every path matters
    for (auto& p : t->parameters()) p.mul_(5.0);
  }
  const auto ids = torch::randint(0, model.vocab_size, {2, 5}, torch::kLong);
  const auto positions = default_position_ids(2, 5);
  const auto targets = torch::randint(0, model.vocab_size, {10}, torch::kLong);
  const auto loss = [&] {
    const auto logits = t(ids, positions).out.view({10, model.vocab_size});
    return torch::nn::functional::cross_entropy(logits, targets);
  };
  std::vector<NamedTensor> inputs;
  for (const auto& item : t->named_parameters()) inputs.push_back({item.key(), item.value()});
  testing::expect_gradients_match(loss, inputs, /*entries_per_input=*/4);
}

}  // namespace
}  // namespace yuanmoe::model
