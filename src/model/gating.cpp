#include "yuanmoe/model/gating.h"

namespace yuanmoe::model {

TopKGates top_k_gates(const Tensor& logits_TE, int64_t k, const Tensor& selection_bias_E) {
  const Tensor selection_scores = selection_bias_E.defined() ? logits_TE + selection_bias_E : logits_TE;
  const Tensor expert_ids_TK = std::get<1>(selection_scores.topk(k, /*dim=*/-1));
  const Tensor selected_logits_TK = logits_TE.gather(-1, expert_ids_TK);
  Tensor gates_TK;
  if (k == 1) {
    // Switch: raw probability of the chosen expert (renormalising would pin it to 1).
    gates_TK = torch::softmax(logits_TE, -1).gather(-1, expert_ids_TK);
  } else {
    gates_TK = torch::softmax(selected_logits_TK, -1);
  }
  return {gates_TK, expert_ids_TK};
}

Tensor relu_gates(const Tensor& logits_TE) { return torch::relu(logits_TE); }

Tensor dense_gates(const Tensor& logits_TE) { return torch::softmax(logits_TE, -1); }

Tensor switch_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK) {
  const int64_t tokens = logits_TE.size(0), experts = logits_TE.size(1);
  const int64_t k = expert_ids_TK.size(1);
  Tensor fraction_routed_E;
  {
    torch::NoGradGuard no_grad;
    fraction_routed_E =
        torch::zeros({experts}, logits_TE.options())
            .scatter_add_(0, expert_ids_TK.reshape(-1),
                          torch::ones({tokens * k}, logits_TE.options())) /
        static_cast<double>(tokens * k);
  }
  const Tensor mean_probability_E = torch::softmax(logits_TE, -1).mean(0);
  return static_cast<double>(experts) * (fraction_routed_E * mean_probability_E).sum();
}

Tensor router_z_loss(const Tensor& logits_TE) {
  return torch::logsumexp(logits_TE, -1).pow(2).mean();
}

Tensor relu_load_balanced_l1(const Tensor& gates_TE, int64_t k) {
  const int64_t tokens = gates_TE.size(0), experts = gates_TE.size(1);
  Tensor activation_ratio_E;
  {
    torch::NoGradGuard no_grad;
    activation_ratio_E = (gates_TE > 0).to(gates_TE.scalar_type()).sum(0) *
                         (static_cast<double>(experts) / static_cast<double>(k * tokens));
  }
  return (gates_TE * activation_ratio_E).sum() / static_cast<double>(tokens);
}

}  // namespace yuanmoe::model
