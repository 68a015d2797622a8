// Expert parallelism on real Gloo groups, ranks as threads (support/on_ranks.h): the collectives
// it adds, and one MoE layer split over two ranks against the whole layer in fp64 (values and
// every gradient).
#include "support/fixtures.h"
#include "support/on_ranks.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/moe.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/expert_parallel.h"

namespace yuanmoe::parallel {
namespace {

using testing::on_ranks;

TEST(CollectivesTest, AllToAllWithUnevenSplitsReduceScatterAndAllGather) {
  on_ranks(2, 1, [](ParallelContext& context) {
    const Group& dp = context.dp;
    const int64_t r = dp.rank();
    // Rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 to rank 0 and none to itself.
    const std::vector<int64_t> send = r == 0 ? std::vector<int64_t>{1, 2} : std::vector<int64_t>{3, 0};
    const std::vector<int64_t> recv = r == 0 ? std::vector<int64_t>{1, 3} : std::vector<int64_t>{2, 0};
    const Tensor rows = torch::arange(3 * 2, torch::kDouble).view({3, 2}) + 100.0 * static_cast<double>(r);
    const Tensor got = dp.all_to_all(rows, send, recv);
    const Tensor want = r == 0 ? torch::cat({rows.narrow(0, 0, 1), torch::arange(6, torch::kDouble).view({3, 2}) + 100})
                               : torch::arange(6, torch::kDouble).view({3, 2}).narrow(0, 1, 2);
    EXPECT_TRUE(torch::equal(got, want)) << got;

    const Tensor input = torch::arange(6, torch::kFloat) * static_cast<float>(r + 1);  // [2 x 3]
    EXPECT_TRUE(torch::equal(dp.reduce_scatter_sum(input), (torch::arange(6, torch::kFloat) * 3).narrow(0, 3 * r, 3)));
    const Tensor gathered = dp.all_gather(torch::full({2}, static_cast<float>(r)));
    EXPECT_TRUE(torch::equal(gathered, torch::tensor({0.f, 0.f, 1.f, 1.f})));
  });
}

TEST(ExpertParallelTest, GroupsFollowMegatronsLayout) {
  on_ranks(4, 1, [](ParallelContext& context) {
    const ParallelLayout& layout = context.layout();
    EXPECT_EQ(layout.ep, 2);
    EXPECT_EQ(layout.ep_rank, layout.dp_rank % 2);
    EXPECT_EQ(context.ep.size(), 2);   // {0, 1}, {2, 3}
    EXPECT_EQ(context.edp.size(), 2);  // {0, 2}, {1, 3}
    EXPECT_EQ(context.ep.rank(), layout.dp_rank % 2);
    EXPECT_EQ(context.edp.rank(), layout.dp_rank / 2);
  }, /*expert=*/2);
}

// Each rank routes its own tokens; the experts are split 4 + 4. Against the whole layer run on
// each rank's tokens in turn (what every rank would compute holding all experts): outputs, input
// gradients, router gradients (summed over ranks: the router is replicated) and each expert's
// gradient (on the rank holding it) equal in fp64, for every router, dropless and with
// moe.capacity_factor (each rank drops over its own tokens before dispatch).
TEST(ExpertParallelTest, MoeLayerOverTwoRanksEqualsTheWholeLayerInDouble) {
  for (const double capacity_factor : {0.0, 1.0}) {
    for (const config::RouterKind router : testing::all_router_kinds()) {
      config::MoeConfig moe = testing::small_moe_config(router);
      moe.capacity_factor = capacity_factor;
      const int64_t hidden = 16, tokens_per_rank = 12;
      torch::manual_seed(5);
      model::Moe whole(moe, hidden);
      whole->to(torch::kDouble);
      const Tensor x = torch::randn({2 * tokens_per_rank, hidden}, torch::kDouble);
      const Tensor probe = torch::randn({2 * tokens_per_rank, hidden}, torch::kDouble);
      const Tensor x_whole = x.clone().requires_grad_(true);
      std::vector<Tensor> whole_outs;
      for (int64_t r = 0; r < 2; ++r) {
        const Tensor out = whole->forward(x_whole.narrow(0, r * tokens_per_rank, tokens_per_rank)).out;
        (out * probe.narrow(0, r * tokens_per_rank, tokens_per_rank)).sum().backward();
        whole_outs.push_back(out.detach());
      }

      std::vector<std::map<std::string, Tensor>> grads(2);
      std::vector<Tensor> outs(2), input_grads(2);
      on_ranks(2, 1, [&](ParallelContext& context) {
        const int64_t r = context.layout().dp_rank;
        model::Transformer holder(testing::small_model_config(), moe);  // apply_expert_parallel takes a model
        model::Moe layer(moe, hidden);
        layer->to(torch::kDouble);
        {
          torch::NoGradGuard no_grad;
          for (const auto& p : whole->named_parameters()) layer->named_parameters()[p.key()].copy_(p.value());
          for (const auto& b : whole->named_buffers()) layer->named_buffers()[b.key()].copy_(b.value());
          const int64_t local = moe.num_experts / 2;
          for (Tensor* w : {&layer->experts->w1, &layer->experts->w2}) w->set_data(w->narrow(0, r * local, local).clone());
        }
        // The dispatcher apply_expert_parallel installs, taken from a model's MoE layer.
        apply_expert_parallel(*holder, context);
        layer->dispatcher = holder->moe_layers().front()->dispatcher;
        const Tensor x_rank = x.narrow(0, r * tokens_per_rank, tokens_per_rank).clone().requires_grad_(true);
        const Tensor out = layer->forward(x_rank).out;
        (out * probe.narrow(0, r * tokens_per_rank, tokens_per_rank)).sum().backward();
        outs[r] = out.detach();
        input_grads[r] = x_rank.grad();
        for (const auto& p : layer->named_parameters()) grads[r][p.key()] = p.value().grad();
      }, /*expert=*/2);

      const std::string name = config::to_string(router) + " capacity " + std::to_string(capacity_factor);
      EXPECT_LT(testing::max_abs_diff(torch::cat(outs), torch::cat(whole_outs)), 1e-12) << name;
      EXPECT_LT(testing::max_abs_diff(torch::cat(input_grads), x_whole.grad()), 1e-12) << name;
      for (const auto& p : whole->named_parameters()) {
        const Tensor want = p.value().grad();
        const Tensor got = p.key().rfind("experts.", 0) == 0 ? torch::cat({grads[0][p.key()], grads[1][p.key()]})
                                                             : grads[0][p.key()] + grads[1][p.key()];
        EXPECT_LT(testing::max_abs_diff(got, want), 1e-12) << name << " " << p.key();
      }
    }
  }
}

}  // namespace
}  // namespace yuanmoe::parallel
