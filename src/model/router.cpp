#include "yuanmoe/model/router.h"

#include "yuanmoe/model/expert_attention.h"

#include <limits>
#include <utility>

namespace yuanmoe::model {

using config::RouterKind;

namespace {

/// Slot e of every token is expert e: the layout of the routers that may use every expert.
Tensor every_expert_TK(const Tensor& logits_TE) {
  const int64_t tokens = logits_TE.size(0), experts = logits_TE.size(1);
  return torch::arange(experts, torch::dtype(torch::kLong).device(logits_TE.device()))
      .expand({tokens, experts});
}
}  // namespace

Routing RouterImpl::forward(const Tensor& x_TD) { return forward(x_TD, TokenGroups{}); }

Routing RouterImpl::forward(const Tensor& x_TD, const TokenGroups& tokens) {
  const bool rerun = std::exchange(rerun_, false);
  // Routers run in fp32 at least: "compute gate in float32 to help stability of expert load
  // balancing" (torchtitan); Yuan uses --use-fp32-router. Autocast is off around the scores, or
  // under train.precision = bf16 it would run their GEMMs in bf16.
  const Tensor logits_TE = [&] {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return score(x_TD.to(at_least_fp32(x_TD)));
  }();
  if (!is_training()) {
    torch::NoGradGuard no_grad;
    const Tensor p_TE = routing_distribution(logits_TE.detach()).to(torch::kDouble);
    const Tensor entropy = -torch::xlogy(p_TE, p_TE).sum();  // xlogy: 0 log 0 = 0
    const Tensor sums = torch::cat({entropy.reshape({1}),
                                    routing_tie_counts(p_TE, config.top_k, config.router == RouterKind::kRelu)});
    eval_sums_ = eval_sums_.defined() ? eval_sums_ + sums : sums;
    eval_tokens_ += logits_TE.size(0);
  }
  return gate(logits_TE, tokens, rerun);
}

void RouterImpl::rerun_next_forward(const Tensor& record) {
  rerun_ = true;
  prepare_rerun(record);
}

Tensor routing_tie_counts(const Tensor& p_TE, int64_t k, bool positive_only) {
  const auto fp64 = torch::dtype(torch::kDouble).device(p_TE.device());
  if (p_TE.size(1) <= k) return torch::zeros({2}, fp64);
  const Tensor largest_TK1 = std::get<0>(p_TE.topk(k + 1, -1));  // sorted, descending
  const Tensor kth_T = largest_TK1.select(1, k - 1), next_T = largest_TK1.select(1, k);
  Tensor tied_T = (kth_T - next_T) <= kRoutingTieTolerance;
  Tensor exactly_tied_T = kth_T == next_T;
  if (positive_only) {
    tied_T = tied_T & (next_T > 0);
    exactly_tied_T = exactly_tied_T & (next_T > 0);
  }
  return torch::stack({tied_T.sum(), exactly_tied_T.sum()}).to(torch::kDouble);
}

RouterEvalStats RouterImpl::take_eval_stats() {
  RouterEvalStats stats;
  if (eval_sums_.defined()) {
    const Tensor sums = eval_sums_.cpu();
    stats.entropy_sum = sums[0].item<double>();
    stats.tied_tokens = sums[1].item<double>();
    stats.exactly_tied_tokens = sums[2].item<double>();
  }
  stats.tokens = eval_tokens_;
  eval_sums_ = Tensor();
  eval_tokens_ = 0;
  return stats;
}

Tensor RouterImpl::routing_distribution(const Tensor& logits_TE) const { return torch::softmax(logits_TE, -1); }

Tensor RouterImpl::linear_scores(const Tensor& x_TD, const Tensor& weight_ED) {
  return torch::matmul(x_TD, weight_ED.to(x_TD.scalar_type()).t());
}

TopKRouterImpl::TopKRouterImpl(const config::MoeConfig& config)
    : RouterImpl(config), has_bias_(config.bias_balancing_rate > 0), balancer_(make_balancer(config)) {
  expert_bias = register_buffer("expert_bias", torch::zeros({config.num_experts}));
}

Routing TopKRouterImpl::gate(const Tensor& logits_TE, const TokenGroups& tokens, bool rerun) {
  TopKGates top = top_k_gates(logits_TE, config.top_k, has_bias_ ? expert_bias : Tensor());
  Routing routing;
  routing.expert_ids_TK = top.expert_ids_TK;
  routing.gates_TK = top.gates_TK;
  if (!is_training()) return routing;
  Tensor aux;
  if (config.aux_loss_coeff > 0) aux = config.aux_loss_coeff * balancer_->loss(logits_TE, top.expert_ids_TK, tokens);
  if (config.z_loss_coeff > 0) {
    Tensor z = config.z_loss_coeff * router_z_loss(logits_TE);
    aux = aux.defined() ? aux + z : z;
  }
  routing.aux_loss = aux;
  if (has_bias_ && !rerun) {  // a rerun counted its tokens in its first run
    const Tensor statistics_E1 = balancer_->bias_statistics(top.expert_ids_TK, tokens);
    step_bias_statistics_E1_ =
        step_bias_statistics_E1_.defined() ? step_bias_statistics_E1_ + statistics_E1 : statistics_E1;
  }
  return routing;
}

void TopKRouterImpl::begin_step() {
  balancer_->begin_step();
  step_bias_statistics_E1_ = Tensor();
}

Tensor TopKRouterImpl::step_bias_statistics() const {
  if (!has_bias_) return Tensor();
  return step_bias_statistics_E1_.defined()
             ? step_bias_statistics_E1_
             : torch::zeros({config.num_experts + 1}, torch::dtype(torch::kDouble).device(expert_bias.device()));
}

void TopKRouterImpl::update_after_step(const RouterStepStats& stats) {
  if (!has_bias_) return;
  torch::NoGradGuard no_grad;
  const Tensor delta = stats.bias_statistics_E1.defined()
                           ? balancer_->bias_delta(stats.bias_statistics_E1, config.bias_balancing_rate)
                           : expert_bias_delta(stats.routed_pairs_E, config.bias_balancing_rate);
  expert_bias.add_(delta.to(expert_bias.options()));
}

AttentionRouterImpl::AttentionRouterImpl(const config::MoeConfig& config, int64_t hidden_size)
    : TopKRouterImpl(config) {
  query = register_module("query", linear_without_bias(hidden_size, config.num_experts));
  key = register_module("key", linear_without_bias(hidden_size, config.num_experts));
  value = register_module("value", linear_without_bias(hidden_size, config.num_experts));
}

Tensor AttentionRouterImpl::score(const Tensor& x_TD) {
  // q, k, v = W_q x, W_k x, W_v x as one [T, D] x [D, 3E] GEMM (Megatron's fused
  // query_key_value weight), then per token an E x E attention over experts.
  return expert_attention(linear_scores(x_TD, torch::cat({query->weight, key->weight, value->weight})));
}

LinearRouterImpl::LinearRouterImpl(const config::MoeConfig& config, int64_t hidden_size)
    : TopKRouterImpl(config) {
  weight = register_parameter("weight", torch::zeros({config.num_experts, hidden_size}));
}

Tensor LinearRouterImpl::score(const Tensor& x_TD) { return linear_scores(x_TD, weight); }

ReluRouterImpl::ReluRouterImpl(const config::MoeConfig& config, int64_t hidden_size)
    : RouterImpl(config) {
  weight = register_parameter("weight", torch::zeros({config.num_experts, hidden_size}));
  l1_coeff = register_buffer("l1_coeff", torch::full({}, config.relu_l1_init, torch::kFloat));
}

Tensor ReluRouterImpl::score(const Tensor& x_TD) { return linear_scores(x_TD, weight); }

Routing ReluRouterImpl::gate(const Tensor& logits_TE, const TokenGroups& /*tokens*/, bool /*rerun*/) {
  const Tensor gates_TE = relu_gates(logits_TE);
  Routing routing;
  routing.gates_TK = gates_TE;
  routing.expert_ids_TK = every_expert_TK(logits_TE);
  routing.skip_zero_gates = true;
  if (is_training()) {
    routing.aux_loss = l1_coeff.to(gates_TE.scalar_type()) *
                       relu_load_balanced_l1(gates_TE, config.top_k);
  }
  return routing;
}

Tensor ReluRouterImpl::routing_distribution(const Tensor& logits_TE) const {
  const Tensor gates_TE = relu_gates(logits_TE);
  return gates_TE / gates_TE.sum(-1, /*keepdim=*/true).clamp_min(std::numeric_limits<float>::min());
}

void ReluRouterImpl::update_after_step(const RouterStepStats& stats) {
  const double target_active =
      static_cast<double>(config.top_k) / static_cast<double>(config.num_experts);
  // next_relu_l1_coeff on the device (reading the coefficient back would make the host wait):
  // the fp32 value times or over alpha in double, then rounded to fp32, as on the host.
  const double factor = next_relu_l1_coeff(1.0, stats.active_fraction_all_layers, target_active, config.relu_l1_alpha);
  const Tensor wide = l1_coeff.to(torch::kDouble);
  torch::NoGradGuard no_grad;
  l1_coeff.copy_(factor >= 1.0 ? wide * config.relu_l1_alpha : wide / config.relu_l1_alpha);
}

DenseRouterImpl::DenseRouterImpl(const config::MoeConfig& config, int64_t hidden_size)
    : RouterImpl(config) {
  weight = register_parameter("weight", torch::zeros({config.num_experts, hidden_size}));
}

Tensor DenseRouterImpl::score(const Tensor& x_TD) { return linear_scores(x_TD, weight); }

Routing DenseRouterImpl::gate(const Tensor& logits_TE, const TokenGroups& /*tokens*/, bool /*rerun*/) {
  Routing routing;
  routing.gates_TK = dense_gates(logits_TE);
  routing.expert_ids_TK = every_expert_TK(logits_TE);
  return routing;
}

std::shared_ptr<RouterImpl> make_router(const config::MoeConfig& config, int64_t hidden_size) {
  switch (config.router) {
    case RouterKind::kAttention:
      return std::make_shared<AttentionRouterImpl>(config, hidden_size);
    case RouterKind::kLinear:
      return std::make_shared<LinearRouterImpl>(config, hidden_size);
    case RouterKind::kRelu:
      return std::make_shared<ReluRouterImpl>(config, hidden_size);
    case RouterKind::kDense:
      return std::make_shared<DenseRouterImpl>(config, hidden_size);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled router kind");
}

}  // namespace yuanmoe::model
