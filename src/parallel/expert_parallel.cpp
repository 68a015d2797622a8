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

/// The ep group's all-to-all with its wall-time accounting, shared by every MoE layer of this
/// rank. Held by reference count, by the dispatchers and by the autograd graph (a capsule).
class RowExchange final : public torch::CustomClassHolder {
 public:
  explicit RowExchange(Group group) : group_(std::move(group)), times_(std::make_shared<ExpertParallelTimes>()) {}
  int64_t size() const { return group_.size(); }
  std::shared_ptr<const ExpertParallelTimes> times() const { return times_; }

  /// Rows per expert this rank sends, int64 [E] -> rows each rank sends to this rank's experts,
  /// [size() * E / size()]: entry r * L + e from rank r for local expert e.
  Tensor exchange_counts(const Tensor& rows_per_expert_E) const {
    const std::vector<int64_t> per_rank(static_cast<size_t>(size()), rows_per_expert_E.size(0) / size());
    return timed(rows_per_expert_E, per_rank, per_rank);
  }
  /// The collective, its wall time added to the all-to-all total.
  Tensor timed(const Tensor& rows, const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) const {
    const Clock::time_point start = Clock::now();
    Tensor out = group_.all_to_all(rows, send_rows, recv_rows);
    times_->all_to_all += seconds_since(start);
    return out;
  }
  /// Forward: the experts' time runs from a layer's dispatch to its combine.
  void dispatched() { dispatched_ = Clock::now(); }
  void combining() { times_->experts_forward += seconds_since(dispatched_); }
  /// Backward: the combine's gradient arrives first, the dispatch's after the experts' backward.
  Tensor backward(const Tensor& grad, bool is_dispatch, const std::vector<int64_t>& send_rows,
                  const std::vector<int64_t>& recv_rows) {
    if (is_dispatch) times_->experts_backward += seconds_since(combined_backward_);
    Tensor out = timed(grad, recv_rows, send_rows);
    if (!is_dispatch) combined_backward_ = Clock::now();
    return out;
  }

 private:
  Group group_;
  std::shared_ptr<ExpertParallelTimes> times_;
  Clock::time_point dispatched_, combined_backward_;
};

/// rows [N, ...]: the first send_rows[0] rows to rank 0, the next send_rows[1] to rank 1, ...;
/// returns the rows received, recv_rows[r] from rank r, in rank order. The gradient goes back
/// the way the rows came (the same exchange with the splits swapped), as Megatron's _AllToAll.
struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static variable_list forward(AutogradContext* ctx, const Tensor& rows, c10::IValue exchange, bool is_dispatch,
                               const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) {
    ctx->saved_data["exchange"] = exchange;
    ctx->saved_data["dispatch"] = is_dispatch;
    ctx->saved_data["send"] = send_rows;
    ctx->saved_data["recv"] = recv_rows;
    return {static_cast<RowExchange*>(exchange.toCapsule().get())->timed(rows, send_rows, recv_rows)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* exchange = static_cast<RowExchange*>(ctx->saved_data["exchange"].toCapsule().get());
    const Tensor grad = exchange->backward(grad_outputs[0], ctx->saved_data["dispatch"].toBool(),
                                           ctx->saved_data["send"].toIntVector(), ctx->saved_data["recv"].toIntVector());
    return {grad, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

/// Megatron's all-to-all token dispatcher: the local plan sorts the pairs by global expert, so
/// the block for rank r (experts [r L, (r + 1) L), L local experts) is contiguous; the counts go
/// first, then the rows, which arrive by (source rank, expert) and are regrouped by local expert.
class AllToAllTokenDispatcher final : public model::TokenDispatcher {
 public:
  AllToAllTokenDispatcher(const config::MoeConfig& config, c10::intrusive_ptr<RowExchange> exchange)
      : by_global_expert_(config), exchange_(std::move(exchange)), local_experts_(config.num_experts / exchange_->size()) {
    TORCH_CHECK(exchange_->size() * local_experts_ == config.num_experts, "expert parallelism: ", exchange_->size(),
                " ranks do not split moe.num_experts ", config.num_experts);
  }

  model::ExpertInput dispatch(const Tensor& x_TD, const model::Routing& routing, bool /*host_counts*/) override {
    // The all-to-all's split sizes live on the host: the counts are read back whatever the kernel.
    const model::ExpertInput planned = by_global_expert_.dispatch(x_TD, routing, /*host_counts=*/true);
    const int64_t ranks = exchange_->size(), local = local_experts_;
    const Tensor sent_counts_E = torch::tensor(planned.rows_per_expert, torch::kLong).to(x_TD.device());
    // received[r * L + e]: rows rank r sends to this rank's local expert e.
    const Tensor received_counts = exchange_->exchange_counts(sent_counts_E).to(torch::kCPU).contiguous();
    const int64_t* received = received_counts.data_ptr<int64_t>();
    send_rows_.assign(ranks, 0);
    recv_rows_.assign(ranks, 0);
    std::vector<int64_t> rows_per_local_expert(local, 0);
    for (int64_t r = 0; r < ranks; ++r) {
      for (int64_t e = 0; e < local; ++e) {
        send_rows_[r] += planned.rows_per_expert[r * local + e];
        recv_rows_[r] += received[r * local + e];
        rows_per_local_expert[e] += received[r * local + e];
      }
    }
    const Tensor arrived_MD = exchange(planned.xs_MD, /*is_dispatch=*/true, send_rows_, recv_rows_);
    exchange_->dispatched();

    // Regroup by local expert (rows of one expert from every source, in rank order): a
    // permutation, so its backward writes each row once (no atomics).
    std::vector<int64_t> by_expert;  // by_expert[i]: the arrived row at position i of the grouped rows
    by_expert.reserve(static_cast<size_t>(arrived_MD.size(0)));
    std::vector<int64_t> block_start(ranks * local + 1, 0);
    for (int64_t i = 0; i < ranks * local; ++i) block_start[i + 1] = block_start[i] + received[i];
    for (int64_t e = 0; e < local; ++e) {
      for (int64_t r = 0; r < ranks; ++r) {
        for (int64_t row = block_start[r * local + e]; row < block_start[r * local + e + 1]; ++row) {
          by_expert.push_back(row);
        }
      }
    }
    const Tensor order_M = torch::tensor(by_expert, torch::kLong).to(x_TD.device());
    inverse_M_ = torch::empty_like(order_M).index_put_({order_M}, torch::arange(order_M.size(0), order_M.options()));
    const Tensor offsets_L =
        torch::tensor(rows_per_local_expert, torch::kLong).cumsum(0).to(torch::kInt).to(x_TD.device());
    return {arrived_MD.index_select(0, order_M), rows_per_local_expert, offsets_L};
  }

  Tensor combine(const Tensor& ys_MD) override {
    exchange_->combining();
    const Tensor ys_arrived_MD = ys_MD.index_select(0, inverse_M_);
    // Back to the ranks the rows came from: the splits of the dispatch, swapped.
    return by_global_expert_.combine(exchange(ys_arrived_MD, /*is_dispatch=*/false, recv_rows_, send_rows_));
  }

  Tensor routed_pairs_E() const override { return by_global_expert_.routed_pairs_E(); }

 private:
  Tensor exchange(const Tensor& rows, bool is_dispatch, const std::vector<int64_t>& send_rows,
                  const std::vector<int64_t>& recv_rows) const {
    if (!rows.requires_grad()) return exchange_->timed(rows, send_rows, recv_rows);
    return AllToAllRows::apply(rows, c10::IValue::make_capsule(exchange_), is_dispatch, send_rows, recv_rows)[0];
  }

  model::LocalTokenDispatcher by_global_expert_;  // plans, gathers and combines by global expert
  c10::intrusive_ptr<RowExchange> exchange_;
  const int64_t local_experts_;
  // The last dispatch's splits and regrouping, until its combine.
  std::vector<int64_t> send_rows_, recv_rows_;
  Tensor inverse_M_;
};

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
  auto exchange = c10::make_intrusive<RowExchange>(parallel.ep);
  sharding.times = exchange->times();
  torch::NoGradGuard no_grad;
  for (model::Moe moe : model.moe_layers()) {
    for (Tensor* weight : {&moe->experts->w1, &moe->experts->w2}) {
      const int64_t local = weight->size(0) / layout.ep;
      // set_data keeps the registered parameter (its name and identity) with the new shape.
      weight->set_data(weight->narrow(0, layout.ep_rank * local, local).clone());
    }
    moe->dispatcher = std::make_shared<AllToAllTokenDispatcher>(moe->config, exchange);
  }
  return sharding;
}

}  // namespace yuanmoe::parallel
