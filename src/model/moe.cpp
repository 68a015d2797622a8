#include "yuanmoe/model/moe.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <torch/csrc/autograd/custom_function.h>

namespace yuanmoe::model {

// ================================================================================================
// gating

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

namespace {

/// 1 for each counted token, 0 for the others, as `sequences` rows: [B, S] in `options`.
Tensor counted_weights(const Tensor& counted_T, int64_t tokens, int64_t sequences, const torch::TensorOptions& options) {
  return (counted_T.defined() ? counted_T.to(options) : torch::ones({tokens}, options)).view({sequences, -1});
}

/// Routed pairs of the counted tokens per sequence and expert, weight_BS as counted_weights: [B, E], no grad.
Tensor sequence_pairs(const Tensor& expert_ids_TK, const Tensor& weight_BS, int64_t experts) {
  torch::NoGradGuard no_grad;
  const int64_t sequences = weight_BS.size(0), length = weight_BS.size(1), k = expert_ids_TK.size(1);
  const Tensor weight_BSK = weight_BS.unsqueeze(2).expand({sequences, length, k});  // each token's K pairs
  return torch::zeros({sequences, experts}, weight_BS.options())
      .scatter_add_(1, expert_ids_TK.reshape({sequences, length * k}), weight_BSK.reshape({sequences, length * k}));
}

}  // namespace

Tensor counted_routed_pairs(const Tensor& expert_ids_TK, const Tensor& counted_T, int64_t experts) {
  const auto options = torch::dtype(torch::kDouble).device(expert_ids_TK.device());
  const Tensor weight_1T = counted_weights(counted_T, expert_ids_TK.size(0), 1, options);  // [1, T]
  const Tensor pairs_E = sequence_pairs(expert_ids_TK, weight_1T, experts)[0];
  return torch::cat({pairs_E, weight_1T.sum().unsqueeze(0)});  // [E + 1]
}

Tensor switch_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const Tensor& counted_T) {
  if (!counted_T.defined()) return switch_load_balancing_loss(logits_TE, expert_ids_TK);
  const int64_t experts = logits_TE.size(1), k = expert_ids_TK.size(1);
  const Tensor weight_T = counted_T.to(logits_TE.options());  // [T], 1 = counted
  const Tensor tokens = weight_T.sum().clamp_min(1.0);       // no counted token: f = P = 0
  const Tensor fraction_routed_E =
      counted_routed_pairs(expert_ids_TK, counted_T, experts).narrow(0, 0, experts).to(logits_TE.scalar_type()) /
      (tokens.detach() * static_cast<double>(k));
  const Tensor mean_probability_E = (torch::softmax(logits_TE, -1) * weight_T.unsqueeze(1)).sum(0) / tokens;
  return static_cast<double>(experts) * (fraction_routed_E * mean_probability_E).sum();
}

Tensor sequence_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const Tensor& counted_T,
                                    int64_t sequences) {
  const int64_t tokens = logits_TE.size(0), experts = logits_TE.size(1), k = expert_ids_TK.size(1);
  TORCH_CHECK(sequences > 0 && tokens % sequences == 0, "sequence balance loss: ", tokens, " tokens are not ",
              sequences, " sequences of equal length");
  const int64_t length = tokens / sequences;
  const Tensor weight_BS = counted_weights(counted_T, tokens, sequences, logits_TE.options());  // [B, S]
  const Tensor tokens_B = weight_BS.sum(1).clamp_min(1.0);  // counted tokens per sequence (0 -> 1: f = P = 0)
  const Tensor fraction_BE =
      sequence_pairs(expert_ids_TK, weight_BS, experts) / (tokens_B.detach().unsqueeze(1) * static_cast<double>(k));
  const Tensor probability_BE =
      (torch::softmax(logits_TE, -1).view({sequences, length, experts}) * weight_BS.unsqueeze(2)).sum(1) /
      tokens_B.unsqueeze(1);
  const Tensor loss_B = static_cast<double>(experts) * (fraction_BE * probability_BE).sum(1);  // [B]
  const Tensor counted_sequences = (weight_BS.sum(1) > 0).sum().clamp_min(1).to(logits_TE.scalar_type());
  return loss_B.sum() / counted_sequences;
}

Tensor global_batch_load_balancing_loss(const Tensor& logits_TE, const Tensor& counted_T, const Tensor& fraction_E,
                                        const Tensor& tokens_per_rank) {
  const int64_t experts = logits_TE.size(1);
  Tensor probability_TE = torch::softmax(logits_TE, -1);
  if (counted_T.defined()) probability_TE = probability_TE * counted_T.to(logits_TE.options()).unsqueeze(1);
  const Tensor probability_sum_E = probability_TE.sum(0);  // [E] over this rank's counted tokens
  return static_cast<double>(experts) *
         (fraction_E.detach().to(logits_TE.scalar_type()) * probability_sum_E).sum() /
         tokens_per_rank.detach().to(logits_TE.scalar_type());
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

// ================================================================================================
// router

using config::RouterKind;

namespace {

/// Slot e of every token is expert e: the layout of the routers that may use every expert.
Tensor every_expert_TK(const Tensor& logits_TE) {
  const int64_t tokens = logits_TE.size(0), experts = logits_TE.size(1);
  return torch::arange(experts, torch::dtype(torch::kLong).device(logits_TE.device()))
      .expand({tokens, experts});
}
}  // namespace

Routing RouterImpl::forward(const Tensor& x_TD) { return forward(x_TD, BalanceInput{}); }

Routing RouterImpl::forward(const Tensor& x_TD, const BalanceInput& balance) {
  // Routers run in fp32 at least: "compute gate in float32 to help stability of expert load
  // balancing" (torchtitan); Yuan uses --use-fp32-router.
  const Tensor logits_TE = score(x_TD.to(at_least_fp32(x_TD)));
  if (!is_training()) {
    torch::NoGradGuard no_grad;
    const Tensor p_TE = routing_distribution(logits_TE.detach()).to(torch::kDouble);
    const Tensor entropy = -torch::xlogy(p_TE, p_TE).sum();  // xlogy: 0 log 0 = 0
    eval_entropy_sum_ = eval_entropy_sum_.defined() ? eval_entropy_sum_ + entropy : entropy;
    eval_tokens_ += logits_TE.size(0);
  }
  return gate(logits_TE, balance);
}

RouterEvalStats RouterImpl::take_eval_stats() {
  RouterEvalStats stats;
  if (eval_entropy_sum_.defined()) stats.entropy_sum = eval_entropy_sum_.item<double>();
  stats.tokens = eval_tokens_;
  eval_entropy_sum_ = Tensor();
  eval_tokens_ = 0;
  return stats;
}

Tensor RouterImpl::routing_distribution(const Tensor& logits_TE) const { return torch::softmax(logits_TE, -1); }

Tensor RouterImpl::linear_scores(const Tensor& x_TD, const Tensor& weight_ED) {
  return torch::matmul(x_TD, weight_ED.to(x_TD.scalar_type()).t());
}

TopKRouterImpl::TopKRouterImpl(const config::MoeConfig& config) : RouterImpl(config) {
  expert_bias = register_buffer("expert_bias", torch::zeros({config.num_experts}));
}

Routing TopKRouterImpl::gate(const Tensor& logits_TE, const BalanceInput& balance) {
  const bool use_bias = config.bias_balancing_rate > 0;
  TopKGates top = top_k_gates(logits_TE, config.top_k, use_bias ? expert_bias : Tensor());
  Routing routing;
  routing.expert_ids_TK = top.expert_ids_TK;
  routing.gates_TK = top.gates_TK;
  if (is_training()) {
    Tensor aux;
    if (config.aux_loss_coeff > 0) {
      Tensor balance_loss;
      switch (config.balance_scope) {
        case config::BalanceScope::kMicroBatch:
          balance_loss = switch_load_balancing_loss(logits_TE, top.expert_ids_TK, balance.counted_T);
          break;
        case config::BalanceScope::kSequence:
          balance_loss =
              sequence_load_balancing_loss(logits_TE, top.expert_ids_TK, balance.counted_T, balance.sequences);
          break;
        case config::BalanceScope::kGlobalBatch: {
          const int64_t experts = config.num_experts;
          const Tensor local_E1 = counted_routed_pairs(top.expert_ids_TK, balance.counted_T, experts);
          Tensor statistics_E1;  // f_E, then the counted tokens per rank
          if (balance.global_statistics) {
            statistics_E1 = balance.global_statistics(local_E1);
          } else {  // this micro-batch alone
            const Tensor tokens = local_E1[experts].clamp_min(1.0);
            statistics_E1 = torch::cat({local_E1.narrow(0, 0, experts) / (tokens * static_cast<double>(config.top_k)),
                                        tokens.unsqueeze(0)});
          }
          balance_loss = global_batch_load_balancing_loss(logits_TE, balance.counted_T,
                                                          statistics_E1.narrow(0, 0, experts), statistics_E1[experts]);
          break;
        }
      }
      aux = config.aux_loss_coeff * balance_loss;
    }
    if (config.z_loss_coeff > 0) {
      Tensor z = config.z_loss_coeff * router_z_loss(logits_TE);
      aux = aux.defined() ? aux + z : z;
    }
    routing.aux_loss = aux;
  }
  return routing;
}

void TopKRouterImpl::update_after_step(const RouterStepStats& stats) {
  if (config.bias_balancing_rate <= 0) return;
  torch::NoGradGuard no_grad;
  const int64_t experts = config.num_experts;
  Tensor delta;
  if (!stats.bias_statistics_E.defined()) {
    delta = expert_bias_delta(stats.routed_pairs_E, config.bias_balancing_rate);
  } else if (config.balance_scope == config::BalanceScope::kSequence) {
    delta = sequence_expert_bias_delta(stats.bias_statistics_E, config.bias_balancing_rate);
  } else {  // micro_batch, global_batch: the step's counted pairs (today's rule)
    delta = expert_bias_delta(stats.bias_statistics_E.narrow(0, 0, experts), config.bias_balancing_rate);
  }
  expert_bias.add_(delta.to(expert_bias.options()));
}

AttentionRouterImpl::AttentionRouterImpl(const config::MoeConfig& config, int64_t hidden_size)
    : TopKRouterImpl(config) {
  query = register_module("query", linear_without_bias(hidden_size, config.num_experts));
  key = register_module("key", linear_without_bias(hidden_size, config.num_experts));
  value = register_module("value", linear_without_bias(hidden_size, config.num_experts));
}

Tensor AttentionRouterImpl::score(const Tensor& x_TD) {
  const Tensor q_TE = linear_scores(x_TD, query->weight);
  const Tensor k_TE = linear_scores(x_TD, key->weight);
  const Tensor v_TE = linear_scores(x_TD, value->weight);
  // Per token an E x E attention over experts: A_ij = q_i k_j (no scaling), row softmax, times v.
  // The weighted sum is a broadcast multiply and a reduction: a bmm over T tiny [E, E] x [E, 1]
  // products is several times slower on CPU (docs/benchmarks.md).
  const Tensor probs_TEE = torch::softmax(q_TE.unsqueeze(2) * k_TE.unsqueeze(1), -1);
  return (probs_TEE * v_TE.unsqueeze(1)).sum(-1);
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

Routing ReluRouterImpl::gate(const Tensor& logits_TE, const BalanceInput& /*balance*/) {
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

Routing DenseRouterImpl::gate(const Tensor& logits_TE, const BalanceInput& /*balance*/) {
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

double next_relu_l1_coeff(double coeff, double active_fraction, double target_active, double alpha) {
  return active_fraction > target_active ? coeff * alpha : coeff / alpha;
}

Tensor expert_bias_delta(const Tensor& routed_pairs_E, double rate) {
  const Tensor counts = routed_pairs_E.to(torch::kFloat);
  const Tensor delta = rate * torch::sign(counts.mean() - counts);
  return delta - delta.mean();
}

Tensor sequence_load_error_signs(const Tensor& pairs_SE) {
  const Tensor counts = pairs_SE.to(torch::kDouble);
  const Tensor has_pairs_S = counts.sum(1) > 0;
  const Tensor signs_SE = torch::sign(counts.mean(1, /*keepdim=*/true) - counts) * has_pairs_S.unsqueeze(1);
  return torch::cat({signs_SE.sum(0), has_pairs_S.sum().to(torch::kDouble).unsqueeze(0)});  // [E + 1]
}

Tensor sequence_expert_bias_delta(const Tensor& sign_sums_E1, double rate) {
  const int64_t experts = sign_sums_E1.size(0) - 1;
  const Tensor sums = sign_sums_E1.to(torch::kDouble);
  // No sequence: no step (a zero delta; the mean of no signs would be 0/0).
  const Tensor delta = (rate * sums.narrow(0, 0, experts) / sums[experts].clamp_min(1.0)).to(torch::kFloat);
  return delta - delta.mean();
}

// ================================================================================================
// mlp

Tensor swiglu(const Tensor& x_TD, const Tensor& w1_2FD, const Tensor& w2_DF) {
  const Tensor u_T2F = torch::matmul(x_TD, w1_2FD.t());
  const int64_t ffn = w1_2FD.size(0) / 2;
  const Tensor h_TF = torch::silu(u_T2F.narrow(-1, 0, ffn)) * u_T2F.narrow(-1, ffn, ffn);
  return torch::matmul(h_TF, w2_DF.t());
}

DenseMlpImpl::DenseMlpImpl(int64_t hidden_size, int64_t ffn_hidden_size) {
  w1 = register_module(
      "w1", linear_without_bias(hidden_size, 2 * ffn_hidden_size));
  w2 = register_module(
      "w2", linear_without_bias(ffn_hidden_size, hidden_size));
}

Tensor DenseMlpImpl::forward(const Tensor& x) { return swiglu(x, w1->weight, w2->weight); }

GroupedExpertsImpl::GroupedExpertsImpl(int64_t num_experts,
                                       int64_t hidden_size,
                                       int64_t ffn_hidden_size) {
  // Values are written by init_weights(); empty() would leave garbage, so start from zeros.
  w1 = register_parameter("w1", torch::zeros({num_experts, 2 * ffn_hidden_size, hidden_size}));
  w2 = register_parameter("w2", torch::zeros({num_experts, hidden_size, ffn_hidden_size}));
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// out = a b, written into `out` (a slice of a larger tensor, hence by value).
void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

/// The first row of each expert's block: the prefix sums of rows_per_expert.
std::vector<int64_t> row_starts(const std::vector<int64_t>& rows_per_expert) {
  std::vector<int64_t> starts(rows_per_expert.size() + 1, 0);
  for (size_t e = 0; e < rows_per_expert.size(); ++e) starts[e + 1] = starts[e] + rows_per_expert[e];
  return starts;
}

/// Calls fn(e, first_row, rows) for every expert with rows. On CPU the experts are spread over the
/// intra-op threads in contiguous groups of about equal rows, and each GEMM runs on one thread
/// (OpenBLAS does inside an OpenMP region): for GEMMs of ~64 rows this beats splitting each GEMM
/// over the threads (docs/benchmarks.md). Callers write disjoint rows and disjoint experts.
void for_each_expert(const std::vector<int64_t>& rows_per_expert, bool on_cpu,
                     const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const std::vector<int64_t> starts = row_starts(rows_per_expert);
  const auto experts = static_cast<int64_t>(rows_per_expert.size());
  const int64_t total = starts.back();
  const int64_t groups = on_cpu ? std::min<int64_t>(at::get_num_threads(), experts) : 1;
  if (groups <= 1 || total == 0) {
    for (int64_t e = 0; e < experts; ++e) {
      if (rows_per_expert[e] > 0) fn(e, starts[e], rows_per_expert[e]);
    }
    return;
  }
  // Expert e joins the group its middle row falls in: monotone in e, so groups are contiguous.
  std::vector<int64_t> group_begin(groups + 1, experts);
  for (int64_t e = experts - 1; e >= 0; --e) {
    const int64_t group = std::min(groups - 1, (2 * starts[e] + rows_per_expert[e]) * groups / (2 * total));
    for (int64_t g = 0; g <= group; ++g) group_begin[g] = std::min(group_begin[g], e);
  }
  group_begin[0] = 0;
  at::parallel_for(0, groups, 1, [&](int64_t first_group, int64_t end_group) {
    torch::NoGradGuard no_grad;  // worker threads start with grad mode on
    for (int64_t g = first_group; g < end_group; ++g) {
      for (int64_t e = group_begin[g]; e < group_begin[g + 1]; ++e) {
        if (rows_per_expert[e] > 0) fn(e, starts[e], rows_per_expert[e]);
      }
    }
  });
}

/// The experts' SwiGLU over rows grouped by expert, with a hand-written backward: GEMMs write
/// straight into slices of one output (no per-expert tensors, no cat, no per-expert gradient
/// stacks), the activation and its derivative run once over all rows, and only x and the
/// pre-activation u are kept for backward. Megatron's GroupedMLP does the same with grouped GEMM
/// kernels.
struct GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xs_ND, const Tensor& w1_E2FD, const Tensor& w2_EDF,
                               const std::vector<int64_t>& rows_per_expert) {
    const Tensor xs = xs_ND.detach().contiguous(), w1 = w1_E2FD.detach(), w2 = w2_EDF.detach();
    const int64_t rows = xs.size(0), ffn = w2.size(2);
    const bool on_cpu = xs.device().is_cpu();
    Tensor u_N2F = torch::empty({rows, 2 * ffn}, xs.options());
    for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
      mm_into(u_N2F.narrow(0, first, n), xs.narrow(0, first, n), w1[e].t());
    });
    const Tensor h_NF = torch::silu(u_N2F.narrow(1, 0, ffn)).mul_(u_N2F.narrow(1, ffn, ffn));
    Tensor ys_ND = torch::empty({rows, w2.size(1)}, xs.options());
    for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
      mm_into(ys_ND.narrow(0, first, n), h_NF.narrow(0, first, n), w2[e].t());
    });
    ctx->save_for_backward({xs, w1, w2, u_N2F});
    ctx->saved_data["rows"] = rows_per_expert;
    return {ys_ND};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &xs = saved[0], &w1 = saved[1], &w2 = saved[2], &u_N2F = saved[3];
    const std::vector<int64_t> rows_per_expert = ctx->saved_data["rows"].toIntVector();
    const Tensor d_ys = grad_outputs[0].contiguous();
    const int64_t ffn = w2.size(2);
    const bool on_cpu = xs.device().is_cpu();

    // h = silu(a) * b with a, b the halves of u; silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
    const Tensor a = u_N2F.narrow(1, 0, ffn), b = u_N2F.narrow(1, ffn, ffn);
    const Tensor sigmoid_a = torch::sigmoid(a), silu_a = a * sigmoid_a;
    const Tensor h_NF = silu_a * b;
    // Weight gradients start empty: every expert with rows writes its whole slice, the rest are
    // zeroed (a full zero-fill would be one more pass over all experts' weights).
    Tensor d_h = torch::empty_like(h_NF), d_w1 = torch::empty_like(w1), d_w2 = torch::empty_like(w2);
    for (size_t e = 0; e < rows_per_expert.size(); ++e) {
      if (rows_per_expert[e] == 0) {
        d_w1[static_cast<int64_t>(e)].zero_();
        d_w2[static_cast<int64_t>(e)].zero_();
      }
    }
    for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
      const Tensor d_ys_e = d_ys.narrow(0, first, n);
      mm_into(d_h.narrow(0, first, n), d_ys_e, w2[e]);
      mm_into(d_w2[e], d_ys_e.t(), h_NF.narrow(0, first, n));
    });
    Tensor d_u = torch::empty_like(u_N2F);
    d_u.narrow(1, 0, ffn).copy_(d_h * b * sigmoid_a * (1 + a * (1 - sigmoid_a)));
    d_u.narrow(1, ffn, ffn).copy_(d_h * silu_a);
    Tensor d_xs = torch::empty_like(xs);
    for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
      const Tensor d_u_e = d_u.narrow(0, first, n);
      mm_into(d_xs.narrow(0, first, n), d_u_e, w1[e]);
      mm_into(d_w1[e], d_u_e.t(), xs.narrow(0, first, n));
    });
    return {d_xs, d_w1, d_w2, Tensor()};
  }
};

}  // namespace

Tensor GroupedExpertsImpl::forward(const Tensor& xs_ND, const std::vector<int64_t>& rows_per_expert) {
  TORCH_CHECK(static_cast<int64_t>(rows_per_expert.size()) == w1.size(0), "GroupedExperts: ", rows_per_expert.size(),
              " row counts for ", w1.size(0), " experts");
  // Under autocast the GEMMs take the autocast dtype, as torch::matmul would; the casts are
  // differentiable outside the function.
  torch::Dtype dtype = xs_ND.scalar_type();
  const c10::DeviceType device_type = xs_ND.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) dtype = at::autocast::get_autocast_dtype(device_type);
  return GroupedSwiGLU::apply(xs_ND.to(dtype), w1.to(dtype), w2.to(dtype), rows_per_expert)[0];
}

Tensor GroupedExpertsImpl::forward_grouped_mm(const Tensor& xs_ND, const Tensor& expert_offsets_E) {
  TORCH_CHECK(expert_offsets_E.size(0) == w1.size(0), "GroupedExperts: ", expert_offsets_E.size(0), " offsets for ",
              w1.size(0), " experts");
  torch::Dtype dtype = xs_ND.scalar_type();
  const c10::DeviceType device_type = xs_ND.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) dtype = at::autocast::get_autocast_dtype(device_type);
  // _grouped_mm multiplies row block e of the first operand by matrix e of the second: the
  // weights as [E, D, 2F] and [E, F, D] views (transposes, no copies).
  const int64_t ffn = w2.size(2);
  const Tensor u_N2F = at::_grouped_mm(xs_ND.to(dtype).contiguous(), w1.to(dtype).transpose(1, 2), expert_offsets_E);
  const Tensor h_NF = torch::silu(u_N2F.narrow(1, 0, ffn)) * u_N2F.narrow(1, ffn, ffn);
  return at::_grouped_mm(h_NF, w2.to(dtype).transpose(1, 2), expert_offsets_E);
}

// ================================================================================================
// moe

MoeImpl::MoeImpl(const config::MoeConfig& config, int64_t hidden_size) : config(config) {
  gate = register_module("gate", make_router(config, hidden_size));
  experts = register_module(
      "experts", GroupedExperts(config.num_experts, hidden_size, config.ffn_hidden_size));
}

MoeOutput MoeImpl::forward(const Tensor& x, const Tensor& counted) {
  const Tensor x_TD = x.reshape({-1, x.size(-1)});
  const bool rerun = std::exchange(rerun_, false);
  if (!rerun) balance_record_ = Tensor();
  BalanceInput balance;
  if (counted.defined()) {
    TORCH_CHECK(counted.sizes() == x.sizes().slice(0, x.dim() - 1), "MoE: counted tokens ", counted.sizes(),
                " do not match the input ", x.sizes());
    balance.counted_T = counted.reshape({-1}).to(torch::dtype(torch::kBool).device(x.device()));  // [T]
  }
  balance.sequences = x.dim() == 3 ? x.size(0) : 1;
  if (config.balance_scope == config::BalanceScope::kGlobalBatch) {
    balance.global_statistics = [this, rerun](const Tensor& local_E1) { return global_statistics(local_E1, rerun); };
  }
  const Routing routing = gate->forward(x_TD, balance);
  const bool has_bias = config.bias_balancing_rate > 0 && dynamic_cast<const TopKRouterImpl*>(gate.get()) != nullptr;
  if (is_training() && !rerun && has_bias) add_bias_statistics(routing.expert_ids_TK, balance);
  // The all-to-all's split sizes live on the host: expert parallelism reads the counts back.
  const bool host_rows = expert_exchange != nullptr || !uses_grouped_mm(x_TD);
  const DispatchPlan dispatch = plan(routing, x_TD.size(0), host_rows);
  const Tensor xs_ND = gather(x_TD, dispatch);
  const Tensor ys_ND = run_experts(xs_ND, dispatch);
  return {combine(ys_ND, dispatch).view(x.sizes()), routing.aux_loss, dispatch.routed_pairs_E};
}

void MoeImpl::begin_step() {
  step_global_counts_ = Tensor();
  step_bias_statistics_ = Tensor();
}

Tensor MoeImpl::step_bias_statistics() const {
  return step_bias_statistics_.defined()
             ? step_bias_statistics_
             : torch::zeros({config.num_experts + 1}, torch::dtype(torch::kDouble).device(experts->w1.device()));
}

void MoeImpl::rerun_next_forward(const Tensor& record) {
  rerun_ = true;
  rerun_record_ = record;
}

Tensor MoeImpl::global_statistics(const Tensor& local_E1, bool rerun) {
  torch::NoGradGuard no_grad;
  if (rerun) {
    // The first run's f: the step's counts have moved on since (later micro-batches), and
    // reducing again would count this micro-batch twice.
    TORCH_CHECK(rerun_record_.defined(), "MoE: a recomputed forward has no global-batch statistics of its first run");
    balance_record_ = std::exchange(rerun_record_, Tensor());
    return balance_record_;
  }
  const int64_t experts = config.num_experts;
  Tensor global_E1 = local_E1.clone();
  if (balance_reducer) balance_reducer->sum(global_E1);  // this micro-batch over the data-parallel ranks
  step_global_counts_ = step_global_counts_.defined() ? step_global_counts_ + global_E1 : global_E1;
  const Tensor step_tokens = step_global_counts_[experts].clamp_min(1.0);
  const Tensor fraction_E =
      step_global_counts_.narrow(0, 0, experts) / (step_tokens * static_cast<double>(config.top_k));
  const double ranks = balance_reducer ? static_cast<double>(balance_reducer->size()) : 1.0;
  const Tensor tokens_per_rank = global_E1[experts].clamp_min(1.0) / ranks;
  balance_record_ = torch::cat({fraction_E, tokens_per_rank.unsqueeze(0)});
  return balance_record_;
}

void MoeImpl::add_bias_statistics(const Tensor& expert_ids_TK, const BalanceInput& balance) {
  torch::NoGradGuard no_grad;
  const int64_t experts = config.num_experts;
  Tensor statistics_E1;
  if (config.balance_scope == config::BalanceScope::kSequence) {
    const auto options = torch::dtype(torch::kDouble).device(expert_ids_TK.device());
    const Tensor weight_BS = counted_weights(balance.counted_T, expert_ids_TK.size(0), balance.sequences, options);
    statistics_E1 = sequence_load_error_signs(sequence_pairs(expert_ids_TK, weight_BS, experts));
  } else {
    statistics_E1 = counted_routed_pairs(expert_ids_TK, balance.counted_T, experts);
  }
  step_bias_statistics_ = step_bias_statistics_.defined() ? step_bias_statistics_ + statistics_E1 : statistics_E1;
}

Tensor MoeImpl::run_experts(const Tensor& xs_ND, const DispatchPlan& plan) {
  if (expert_exchange) return run_experts_across_ranks(xs_ND, plan);
  return run_local_experts(xs_ND, plan.rows_per_expert, plan.expert_offsets_E);
}

Tensor MoeImpl::run_local_experts(const Tensor& xs_ND, const std::vector<int64_t>& rows_per_expert,
                                  const Tensor& expert_offsets_E) {
  return uses_grouped_mm(xs_ND) ? experts->forward_grouped_mm(xs_ND, expert_offsets_E)
                                : experts->forward(xs_ND, rows_per_expert);
}

Tensor MoeImpl::run_experts_across_ranks(const Tensor& xs_ND, const DispatchPlan& plan) {
  // Megatron's all-to-all dispatcher: the rows are sorted by global expert, so the block for rank
  // r (experts [r L, (r + 1) L), L local experts) is contiguous. Counts first, then rows.
  const ExpertExchange& exchange = *expert_exchange;
  const int64_t ranks = exchange.size(), local = experts->w1.size(0);
  TORCH_CHECK(ranks * local == config.num_experts, "expert parallelism: ", ranks, " ranks x ", local,
              " experts is not moe.num_experts ", config.num_experts);
  const Tensor sent_counts_E = torch::tensor(plan.rows_per_expert, torch::kLong).to(xs_ND.device());
  // received_counts[r * L + e]: rows rank r sends to this rank's local expert e.
  const Tensor received_counts = exchange.exchange_counts(sent_counts_E).to(torch::kCPU).contiguous();  // [ranks * L]
  const int64_t* received = received_counts.data_ptr<int64_t>();
  std::vector<int64_t> send_rows(ranks, 0), recv_rows(ranks, 0), rows_per_local_expert(local, 0);
  for (int64_t r = 0; r < ranks; ++r) {
    for (int64_t e = 0; e < local; ++e) {
      send_rows[r] += plan.rows_per_expert[r * local + e];
      recv_rows[r] += received[r * local + e];
      rows_per_local_expert[e] += received[r * local + e];
    }
  }
  const Tensor arrived_MD = exchange.dispatch(xs_ND, send_rows, recv_rows);  // by (source rank, expert)

  // Regroup by local expert (rows of one expert from every source, in rank order): a
  // permutation, so its backward writes each row once (no atomics).
  std::vector<int64_t> by_expert;  // by_expert[i]: the arrived row at position i of the grouped rows
  by_expert.reserve(static_cast<size_t>(arrived_MD.size(0)));
  std::vector<int64_t> block_start(ranks * local + 1, 0);
  for (int64_t i = 0; i < ranks * local; ++i) block_start[i + 1] = block_start[i] + received[i];
  for (int64_t e = 0; e < local; ++e) {
    for (int64_t r = 0; r < ranks; ++r) {
      for (int64_t row = block_start[r * local + e]; row < block_start[r * local + e + 1]; ++row) by_expert.push_back(row);
    }
  }
  const Tensor order = torch::tensor(by_expert, torch::kLong).to(xs_ND.device());  // [M]
  const Tensor inverse = torch::empty_like(order).index_put_({order}, torch::arange(order.size(0), order.options()));
  const Tensor grouped_MD = arrived_MD.index_select(0, order);
  const Tensor offsets_L =
      torch::tensor(rows_per_local_expert, torch::kLong).cumsum(0).to(torch::kInt).to(xs_ND.device());
  const Tensor ys_grouped_MD = run_local_experts(grouped_MD, rows_per_local_expert, offsets_L);
  const Tensor ys_arrived_MD = ys_grouped_MD.index_select(0, inverse);
  return exchange.combine(ys_arrived_MD, recv_rows, send_rows);  // [N, D] in plan order
}

bool MoeImpl::uses_grouped_mm(const Tensor& x) const {
  switch (config.expert_gemm) {
    case config::ExpertGemm::kLoop:
      return false;
    case config::ExpertGemm::kGroupedMm:
      return true;
    case config::ExpertGemm::kAuto:
      break;
  }
  const c10::DeviceType device = x.device().type();
  const torch::Dtype dtype =
      at::autocast::is_autocast_enabled(device) ? at::autocast::get_autocast_dtype(device) : x.scalar_type();
  return x.is_cuda() && dtype == torch::kBFloat16;
}

DispatchPlan MoeImpl::plan(const Routing& routing, int64_t tokens, bool host_rows) const {
  const int64_t slots = routing.expert_ids_TK.size(1), experts_count = config.num_experts;
  Tensor pair_ids_N = torch::arange(tokens * slots, routing.expert_ids_TK.options());
  Tensor expert_ids_N = routing.expert_ids_TK.reshape(-1);
  Tensor gates_N = routing.gates_TK.reshape(-1);
  if (routing.skip_zero_gates) {
    pair_ids_N = torch::nonzero(gates_N).squeeze(1);
    expert_ids_N = expert_ids_N.index_select(0, pair_ids_N);
    gates_N = gates_N.index_select(0, pair_ids_N);
  }

  // Stable: inside an expert, pairs keep batch order (deterministic; capacity drops by position).
  auto [sorted_experts_N, order_N] = torch::sort(expert_ids_N, /*stable=*/c10::optional<bool>(true), /*dim=*/0);
  // Pairs per expert from the sorted ids (bincount would read the largest id back to the host on
  // CUDA to size its output: a synchronisation).
  const Tensor expert_ids_E = torch::arange(experts_count, expert_ids_N.options());
  Tensor expert_rows_E = torch::searchsorted(sorted_experts_N, expert_ids_E, /*out_int32=*/false, /*right=*/true) -
                         torch::searchsorted(sorted_experts_N, expert_ids_E, /*out_int32=*/false, /*right=*/false);
  DispatchPlan result;
  result.routed_pairs_E = expert_rows_E;  // before drops: what the router asked for
  if (config.capacity_factor > 0) {
    // docs/routers.md: C = ceil(cf * T * k / E); later pairs of an overfull expert are dropped and
    // the residual carries their token unchanged.
    const auto capacity = static_cast<int64_t>(std::ceil(
        config.capacity_factor * static_cast<double>(tokens * slots) / experts_count));
    const Tensor expert_start_E = expert_rows_E.cumsum(0) - expert_rows_E;
    const Tensor rank_in_expert_N = torch::arange(order_N.size(0), order_N.options()) -
                                    expert_start_E.index_select(0, sorted_experts_N);
    order_N = order_N.masked_select(rank_in_expert_N < capacity);
    expert_rows_E = expert_rows_E.clamp_max(capacity);
  }

  result.expert_offsets_E = expert_rows_E.cumsum(0).to(torch::kInt);
  if (host_rows) {
    // The loop's one host sync per layer: the per-expert row counts drive its GEMMs.
    const Tensor counts_cpu = expert_rows_E.to(torch::kCPU).contiguous();
    result.rows_per_expert.assign(counts_cpu.data_ptr<int64_t>(), counts_cpu.data_ptr<int64_t>() + experts_count);
  }
  result.pair_ids_N = pair_ids_N.index_select(0, order_N);
  result.gates_N = gates_N.index_select(0, order_N);
  result.tokens = tokens;
  result.slots = slots;
  return result;
}

namespace {

/// xs_ND = x_TD[pair_N / K] with a backward without atomics: index_select's own backward is an
/// index_add over duplicate token ids, whose float atomics on CUDA sum in a varying order. Here
/// each pair's gradient goes to its own (token, slot) row (unique: index_copy) and the K slots
/// are summed in slot order, as combine() does forward: the same bits on every run and device.
struct GatherPairs : public torch::autograd::Function<GatherPairs> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_TD, const Tensor& pair_ids_N, int64_t slots) {
    ctx->save_for_backward({pair_ids_N});
    ctx->saved_data["slots"] = slots;
    ctx->saved_data["tokens"] = x_TD.size(0);
    return {x_TD.index_select(0, torch::div(pair_ids_N, slots, "floor"))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor pair_ids_N = ctx->get_saved_variables()[0];
    const int64_t slots = ctx->saved_data["slots"].toInt(), tokens = ctx->saved_data["tokens"].toInt();
    const Tensor& d_xs_ND = grad_outputs[0];
    const int64_t hidden = d_xs_ND.size(1);
    const Tensor slot_rows = torch::zeros({tokens * slots, hidden}, d_xs_ND.options());  // [T * K, D]
    const Tensor d_x_TD =
        torch::index_copy(slot_rows, 0, pair_ids_N, d_xs_ND).view({tokens, slots, hidden}).sum(1);
    return {d_x_TD, Tensor(), Tensor()};
  }
};

}  // namespace

Tensor MoeImpl::gather(const Tensor& x_TD, const DispatchPlan& plan) {
  return GatherPairs::apply(x_TD, plan.pair_ids_N, plan.slots)[0];
}

Tensor MoeImpl::combine(const Tensor& ys_ND, const DispatchPlan& plan) {
  const Tensor scaled_ND = ys_ND * plan.gates_N.unsqueeze(1).to(ys_ND.scalar_type());
  const int64_t hidden = ys_ND.size(1);
  const Tensor slot_rows = torch::zeros({plan.tokens * plan.slots, hidden}, ys_ND.options());
  return torch::index_copy(slot_rows, 0, plan.pair_ids_N, scaled_ND).view({plan.tokens, plan.slots, hidden}).sum(1);
}

}  // namespace yuanmoe::model
