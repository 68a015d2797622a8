#include "yuanmoe/parallel/balance_reducer.h"

namespace yuanmoe::parallel {

namespace {

class GroupStatisticsReducer final : public model::StatisticsReducer {
 public:
  explicit GroupStatisticsReducer(Group group) : group_(std::move(group)) {}
  int64_t size() const override { return group_.size(); }
  void sum(Tensor& tensor) const override { group_.all_reduce_sum(tensor); }

 private:
  Group group_;
};

}  // namespace

std::shared_ptr<const model::StatisticsReducer> make_balance_reducer(const ParallelContext& parallel) {
  if (parallel.dp.size() == 1) return nullptr;
  return std::make_shared<const GroupStatisticsReducer>(parallel.dp);
}

void apply_balance_reducer(model::TransformerImpl& model, const ParallelContext& parallel) {
  const std::shared_ptr<const model::StatisticsReducer> reducer = make_balance_reducer(parallel);
  for (const model::Moe& moe : model.moe_layers()) {
    if (auto* router = dynamic_cast<model::TopKRouterImpl*>(moe->gate.get())) router->balancer().set_reducer(reducer);
  }
}

}  // namespace yuanmoe::parallel
