#include "yuanmoe/parallel/expert_parallel.h"

#include <torch/csrc/autograd/custom_function.h>

#include <unordered_set>

namespace yuanmoe::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Group::all_to_all for autograd: the gradient of the rows received is sent back to where they
/// came from (the same exchange with the splits swapped), as Megatron's _AllToAll does.
struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static variable_list forward(AutogradContext* ctx, const Tensor& rows, const Group* group,
                               const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) {
    // The group outlives the graph (the model owns the exchange that owns it): kept by address.
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    ctx->saved_data["send"] = send_rows;
    ctx->saved_data["recv"] = recv_rows;
    return {group->all_to_all(rows, send_rows, recv_rows)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto* group = reinterpret_cast<const Group*>(ctx->saved_data["group"].toInt());
    const std::vector<int64_t> send_rows = ctx->saved_data["send"].toIntVector();
    const std::vector<int64_t> recv_rows = ctx->saved_data["recv"].toIntVector();
    return {group->all_to_all(grad_outputs[0], recv_rows, send_rows), Tensor(), Tensor(), Tensor()};
  }
};

class GroupExchange final : public model::ExpertExchange {
 public:
  explicit GroupExchange(Group group) : group_(std::move(group)) {}
  int64_t size() const override { return group_.size(); }
  Tensor all_to_all(const Tensor& rows, const std::vector<int64_t>& send_rows,
                    const std::vector<int64_t>& recv_rows) const override {
    if (!rows.requires_grad()) return group_.all_to_all(rows, send_rows, recv_rows);
    return AllToAllRows::apply(rows, &group_, send_rows, recv_rows)[0];
  }

 private:
  Group group_;
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
  auto exchange = std::make_shared<const GroupExchange>(parallel.ep);
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
