#include "yuanmoe/parallel/expert_parallel.h"

#include <torch/csrc/autograd/custom_function.h>

#include <chrono>
#include <unordered_set>

namespace yuanmoe::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

class GroupExchange;

/// The exchange for autograd: the gradient of the rows received goes back to where they came
/// from (the same exchange with the splits swapped), as Megatron's _AllToAll does.
struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static variable_list forward(AutogradContext* ctx, const Tensor& rows, const GroupExchange* exchange,
                               bool is_dispatch, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows);
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs);
};

class GroupExchange final : public model::ExpertExchange {
 public:
  explicit GroupExchange(Group group) : group_(std::move(group)), times_(std::make_shared<ExpertParallelTimes>()) {}
  int64_t size() const override { return group_.size(); }
  std::shared_ptr<const ExpertParallelTimes> times() const { return times_; }

  Tensor exchange_counts(const Tensor& rows_per_expert_E) const override {
    const std::vector<int64_t> per_rank(static_cast<size_t>(size()), rows_per_expert_E.size(0) / size());
    return timed(rows_per_expert_E, per_rank, per_rank);
  }
  Tensor dispatch(const Tensor& rows, const std::vector<int64_t>& send_rows,
                  const std::vector<int64_t>& recv_rows) const override {
    const Tensor out = rows.requires_grad() ? AllToAllRows::apply(rows, this, true, send_rows, recv_rows)[0]
                                            : timed(rows, send_rows, recv_rows);
    dispatched_ = Clock::now();
    return out;
  }
  Tensor combine(const Tensor& rows, const std::vector<int64_t>& send_rows,
                 const std::vector<int64_t>& recv_rows) const override {
    times_->experts_forward += seconds_since(dispatched_);
    return rows.requires_grad() ? AllToAllRows::apply(rows, this, false, send_rows, recv_rows)[0]
                                : timed(rows, send_rows, recv_rows);
  }

  /// The collective, its wall time added to the all-to-all total.
  Tensor timed(const Tensor& rows, const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) const {
    const Clock::time_point start = Clock::now();
    Tensor out = group_.all_to_all(rows, send_rows, recv_rows);
    times_->all_to_all += seconds_since(start);
    return out;
  }
  /// Backward: the combine's gradient arrives first, the dispatch's after the experts' backward.
  Tensor backward(const Tensor& grad, bool is_dispatch, const std::vector<int64_t>& send_rows,
                  const std::vector<int64_t>& recv_rows) const {
    if (is_dispatch) times_->experts_backward += seconds_since(combined_backward_);
    Tensor out = timed(grad, recv_rows, send_rows);
    if (!is_dispatch) combined_backward_ = Clock::now();
    return out;
  }

 private:
  Group group_;
  std::shared_ptr<ExpertParallelTimes> times_;
  mutable Clock::time_point dispatched_, combined_backward_;
};

variable_list AllToAllRows::forward(AutogradContext* ctx, const Tensor& rows, const GroupExchange* exchange,
                                    bool is_dispatch, const std::vector<int64_t>& send_rows,
                                    const std::vector<int64_t>& recv_rows) {
  // The exchange outlives the graph (the model's MoE layers own it): kept by address.
  ctx->saved_data["exchange"] = reinterpret_cast<int64_t>(exchange);
  ctx->saved_data["dispatch"] = is_dispatch;
  ctx->saved_data["send"] = send_rows;
  ctx->saved_data["recv"] = recv_rows;
  return {exchange->timed(rows, send_rows, recv_rows)};
}

variable_list AllToAllRows::backward(AutogradContext* ctx, variable_list grad_outputs) {
  const auto* exchange = reinterpret_cast<const GroupExchange*>(ctx->saved_data["exchange"].toInt());
  const Tensor grad = exchange->backward(grad_outputs[0], ctx->saved_data["dispatch"].toBool(),
                                         ctx->saved_data["send"].toIntVector(), ctx->saved_data["recv"].toIntVector());
  return {grad, Tensor(), Tensor(), Tensor(), Tensor()};
}

std::string parameter_of(const std::string& entry) { return entry.substr(0, entry.find('/')); }

}  // namespace

bool ExpertSharding::is_expert_entry(const std::string& entry) const {
  return names.count(parameter_of(entry)) > 0;
}

checkpoint::NamedTensors ExpertSharding::to_local(const checkpoint::NamedTensors& global) const {
  if (ranks == 1) return global;
  checkpoint::NamedTensors out;
  for (const auto& [name, t] : global) {
    if (!is_expert_entry(name) || t.dim() == 0) {  // "{name}/step" is a scalar
      out.emplace_back(name, t);
      continue;
    }
    TORCH_CHECK(t.size(0) % ranks == 0, name, ": ", t.size(0), " experts do not split over ", ranks, " ranks");
    const int64_t local = t.size(0) / ranks;
    out.emplace_back(name, t.narrow(0, rank * local, local));
  }
  return out;
}

checkpoint::NamedTensors ExpertSharding::to_global(const checkpoint::NamedTensors& local, const Group& ep) const {
  if (ranks == 1) return local;
  checkpoint::NamedTensors out;
  for (const auto& [name, t] : local) {
    out.emplace_back(name, is_expert_entry(name) && t.dim() > 0 ? ep.all_gather(t.contiguous()) : t);
  }
  return out;
}

ExpertSharding expert_weights(const model::TransformerImpl& model) {
  std::unordered_set<const void*> experts;
  for (const model::Moe& moe : model.moe_layers()) {
    for (const Tensor& p : moe->experts->parameters()) experts.insert(p.unsafeGetTensorImpl());
  }
  ExpertSharding sharding;
  for (const auto& item : model.named_parameters()) {
    if (experts.count(item.value().unsafeGetTensorImpl())) sharding.names.insert(item.key());
  }
  return sharding;
}

ExpertSharding apply_expert_parallel(model::TransformerImpl& model, const ParallelContext& parallel) {
  ExpertSharding sharding = expert_weights(model);
  const ParallelLayout& layout = parallel.layout();
  if (layout.ep == 1) return sharding;
  sharding.ranks = layout.ep;
  sharding.rank = layout.ep_rank;
  auto exchange = std::make_shared<const GroupExchange>(parallel.ep);
  sharding.times = exchange->times();
  torch::NoGradGuard no_grad;
  for (model::Moe moe : model.moe_layers()) {
    for (Tensor* weight : {&moe->experts->w1, &moe->experts->w2}) {
      const int64_t local = weight->size(0) / layout.ep;
      // set_data keeps the registered parameter (its name and identity) with the new shape.
      weight->set_data(weight->narrow(0, layout.ep_rank * local, local).clone());
    }
    moe->expert_exchange = exchange;
  }
  return sharding;
}

}  // namespace yuanmoe::parallel
