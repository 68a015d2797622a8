#include "yuanmoe/parallel/balance_reducer.h"

namespace yuanmoe::parallel {

namespace {

class GroupBalanceReducer final : public model::BalanceReducer {
 public:
  explicit GroupBalanceReducer(Group group) : group_(std::move(group)) {}
  int64_t size() const override { return group_.size(); }
  void sum(Tensor& tensor) const override { group_.all_reduce_sum(tensor); }

 private:
  Group group_;
};

}  // namespace

void apply_balance_reducer(model::TransformerImpl& model, const ParallelContext& parallel) {
  std::shared_ptr<const model::BalanceReducer> reducer;
  if (parallel.dp.size() > 1) reducer = std::make_shared<const GroupBalanceReducer>(parallel.dp);
  for (model::Moe moe : model.moe_layers()) {
    moe->balance_reducer = moe->config.balance_scope == config::BalanceScope::kGlobalBatch ? reducer : nullptr;
  }
}

}  // namespace yuanmoe::parallel
