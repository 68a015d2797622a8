#include "yuanmoe/model/moe.h"

namespace yuanmoe::model {

MoeImpl::MoeImpl(const config::MoeConfig& config, int64_t hidden_size)
    : config(config), dispatcher(std::make_shared<LocalTokenDispatcher>(config)) {
  gate = register_module("gate", make_router(config, hidden_size));
  experts = register_module(
      "experts", GroupedExperts(config.num_experts, hidden_size, config.ffn_hidden_size, config.expert_gemm));
}

MoeOutput MoeImpl::forward(const Tensor& x, const Tensor& counted) {
  const Tensor x_TD = x.reshape({-1, x.size(-1)});
  TokenGroups tokens;
  if (counted.defined()) {
    TORCH_CHECK(counted.sizes() == x.sizes().slice(0, x.dim() - 1), "MoE: counted tokens ", counted.sizes(),
                " do not match the input ", x.sizes());
    tokens.counted_T = counted.reshape({-1}).to(torch::dtype(torch::kBool).device(x.device()));
  }
  tokens.sequences = x.dim() == 3 ? x.size(0) : 1;
  const Routing routing = gate->forward(x_TD, tokens);
  const ExpertInput input = dispatcher->dispatch(x_TD, routing, /*host_counts=*/!experts->uses_grouped_mm(x_TD));
  const Tensor ys_MD = experts->forward(input);
  return {dispatcher->combine(ys_MD).view(x.sizes()), routing.aux_loss, dispatcher->routed_pairs_E()};
}

}  // namespace yuanmoe::model
