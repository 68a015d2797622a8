#include "yuanmoe/model/moe.h"

namespace yuanmoe::model {

MoeImpl::MoeImpl(const config::MoeConfig& config, int64_t hidden_size)
    : config(config), dispatcher(std::make_shared<LocalTokenDispatcher>(config)) {
  gate = register_module("gate", make_router(config, hidden_size));
  experts = register_module(
      "experts", GroupedExperts(config.num_experts, hidden_size, config.ffn_hidden_size, config.expert_gemm));
}

MoeOutput MoeImpl::forward(const Tensor& x) {
  const Tensor x_TD = x.reshape({-1, x.size(-1)});
  TokenGroups tokens;
  tokens.sequences = x.dim() == 3 ? x.size(0) : 1;
  const Routing routing = gate->forward(x_TD, tokens);
  const ExpertInput input = dispatcher->dispatch(x_TD, routing, /*host_counts=*/!experts->uses_grouped_mm(x_TD));
  const Tensor ys_MD = experts->forward(input);
  return {dispatcher->combine(ys_MD).view(x.sizes()), routing.aux_loss, dispatcher->routed_pairs_E()};
}

}  // namespace yuanmoe::model
