#include "yuanmoe/model/balancing.h"

#include <utility>

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

namespace {

/// Routed pairs per sequence and expert: [B, E] in `options`, no grad. The T rows of expert_ids_TK
/// are `sequences` sequences of equal length, in order.
Tensor sequence_pairs(const Tensor& expert_ids_TK, int64_t sequences, int64_t experts,
                      const torch::TensorOptions& options) {
  torch::NoGradGuard no_grad;
  const Tensor ids_BP = expert_ids_TK.reshape({sequences, -1});  // each sequence's S * K pairs
  return torch::zeros({sequences, experts}, options).scatter_add_(1, ids_BP, torch::ones(ids_BP.sizes(), options));
}

}  // namespace

Tensor routed_pairs_and_tokens(const Tensor& expert_ids_TK, int64_t experts) {
  const auto options = torch::dtype(torch::kDouble).device(expert_ids_TK.device());
  const Tensor pairs_E = sequence_pairs(expert_ids_TK, 1, experts, options)[0];
  const Tensor tokens = torch::full({1}, static_cast<double>(expert_ids_TK.size(0)), options);
  return torch::cat({pairs_E, tokens});  // [E + 1]
}

Tensor sequence_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, int64_t sequences) {
  const int64_t tokens = logits_TE.size(0), experts = logits_TE.size(1), k = expert_ids_TK.size(1);
  TORCH_CHECK(sequences > 0 && tokens % sequences == 0, "sequence balance loss: ", tokens, " tokens are not ",
              sequences, " sequences of equal length");
  const int64_t length = tokens / sequences;
  // The divisors as tensors: a scalar divisor may take another kernel path (and other bits).
  const Tensor length_B1 = torch::full({sequences, 1}, static_cast<double>(length), logits_TE.options());
  const Tensor fraction_BE =
      sequence_pairs(expert_ids_TK, sequences, experts, logits_TE.options()) / (length_B1 * static_cast<double>(k));
  const Tensor probability_BE = torch::softmax(logits_TE, -1).view({sequences, length, experts}).sum(1) / length_B1;
  const Tensor loss_B = static_cast<double>(experts) * (fraction_BE * probability_BE).sum(1);  // [B]
  return loss_B.sum() / torch::full({}, static_cast<double>(sequences), logits_TE.options());
}

Tensor global_batch_load_balancing_loss(const Tensor& logits_TE, const Tensor& fraction_E,
                                        const Tensor& tokens_per_rank) {
  const int64_t experts = logits_TE.size(1);
  const Tensor probability_sum_E = torch::softmax(logits_TE, -1).sum(0);  // [E] over this rank's tokens
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

double next_relu_l1_coeff(double coeff, double active_fraction, double target_active, double alpha) {
  return active_fraction > target_active ? coeff * alpha : coeff / alpha;
}

Tensor expert_bias_delta(const Tensor& routed_pairs_E, double rate) {
  const Tensor counts = routed_pairs_E.to(torch::kFloat);
  const Tensor delta = rate * torch::sign(counts.mean() - counts);
  return delta - delta.mean();
}

Tensor sequence_load_error_signs(const Tensor& pairs_BE) {
  const Tensor counts = pairs_BE.to(torch::kDouble);
  const Tensor has_pairs_B = counts.sum(1) > 0;
  const Tensor signs_BE = torch::sign(counts.mean(1, /*keepdim=*/true) - counts) * has_pairs_B.unsqueeze(1);
  return torch::cat({signs_BE.sum(0), has_pairs_B.sum().to(torch::kDouble).unsqueeze(0)});  // [E + 1]
}

Tensor sequence_expert_bias_delta(const Tensor& sign_sums_E1, double rate) {
  const int64_t experts = sign_sums_E1.size(0) - 1;
  const Tensor sums = sign_sums_E1.to(torch::kDouble);
  // No sequence: no step (a zero delta; the mean of no signs would be 0/0).
  const Tensor delta = (rate * sums.narrow(0, 0, experts) / sums[experts].clamp_min(1.0)).to(torch::kFloat);
  return delta - delta.mean();
}

// ------------------------------------------------------------------------------------------------
// Balancers

Tensor Balancer::bias_statistics(const Tensor& expert_ids_TK, const TokenGroups& tokens) const {
  torch::NoGradGuard no_grad;
  return routed_pairs_and_tokens(expert_ids_TK, experts_);
}

Tensor Balancer::bias_delta(const Tensor& statistics_E1, double rate) const {
  return expert_bias_delta(statistics_E1.narrow(0, 0, experts_), rate);  // the step's pairs
}

namespace {

/// moe.balance_scope = micro_batch: the Switch loss of each micro-batch on its own.
class MicroBatchBalancer final : public Balancer {
 public:
  explicit MicroBatchBalancer(const config::MoeConfig& config) : Balancer(config) {}
  Tensor loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const TokenGroups& /*tokens*/) override {
    return switch_load_balancing_loss(logits_TE, expert_ids_TK);
  }
};

/// moe.balance_scope = sequence: DeepSeek-V3's per-sequence loss, and per-sequence bias signs.
class SequenceBalancer final : public Balancer {
 public:
  explicit SequenceBalancer(const config::MoeConfig& config) : Balancer(config) {}
  Tensor loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const TokenGroups& tokens) override {
    return sequence_load_balancing_loss(logits_TE, expert_ids_TK, tokens.sequences);
  }
  Tensor bias_statistics(const Tensor& expert_ids_TK, const TokenGroups& tokens) const override {
    const auto options = torch::dtype(torch::kDouble).device(expert_ids_TK.device());
    return sequence_load_error_signs(sequence_pairs(expert_ids_TK, tokens.sequences, experts_, options));
  }
  Tensor bias_delta(const Tensor& sign_sums_E1, double rate) const override {
    return sequence_expert_bias_delta(sign_sums_E1, rate);
  }
};

/// moe.balance_scope = global_batch: f from the routed pairs of the whole step so far, over
/// every data-parallel rank (Megatron-Core's global_aux_loss, docs/routers.md).
class GlobalBatchBalancer final : public Balancer {
 public:
  explicit GlobalBatchBalancer(const config::MoeConfig& config) : Balancer(config) {}
  Tensor loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const TokenGroups& tokens) override {
    const Tensor statistics_E1 = step_statistics(routed_pairs_and_tokens(expert_ids_TK, experts_));
    return global_batch_load_balancing_loss(logits_TE, statistics_E1.narrow(0, 0, experts_), statistics_E1[experts_]);
  }
  void begin_step() override { step_counts_E1_ = Tensor(); }
  void set_reducer(std::shared_ptr<const StatisticsReducer> reducer) override { reducer_ = std::move(reducer); }
  Tensor record() const override { return record_; }
  void rerun_next(const Tensor& record) override {
    rerun_ = true;
    rerun_record_ = record;
  }

 private:
  /// This micro-batch's routed pairs and tokens, fp64 [E + 1] -> f_E of the step so far and the
  /// micro-batch's tokens per rank, [E + 1].
  Tensor step_statistics(const Tensor& local_E1) {
    torch::NoGradGuard no_grad;
    if (std::exchange(rerun_, false)) {
      // The first run's f: the step's counts have moved on since (later micro-batches), and
      // reducing again would count this micro-batch twice.
      TORCH_CHECK(rerun_record_.defined(), "MoE: a recomputed forward has no global-batch statistics of its first run");
      record_ = std::exchange(rerun_record_, Tensor());
      return record_;
    }
    Tensor global_E1 = local_E1.clone();
    if (reducer_) reducer_->sum(global_E1);  // this micro-batch over the data-parallel ranks
    step_counts_E1_ = step_counts_E1_.defined() ? step_counts_E1_ + global_E1 : global_E1;
    const Tensor step_tokens = step_counts_E1_[experts_].clamp_min(1.0);
    const Tensor fraction_E = step_counts_E1_.narrow(0, 0, experts_) / (step_tokens * static_cast<double>(top_k_));
    const double ranks = reducer_ ? static_cast<double>(reducer_->size()) : 1.0;
    const Tensor tokens_per_rank = global_E1[experts_].clamp_min(1.0) / ranks;
    record_ = torch::cat({fraction_E, tokens_per_rank.unsqueeze(0)});
    return record_;
  }

  std::shared_ptr<const StatisticsReducer> reducer_;
  Tensor step_counts_E1_;  // routed pairs per expert and tokens, all ranks, the step so far
  Tensor record_;          // f_E and tokens per rank of the last forward
  bool rerun_ = false;
  Tensor rerun_record_;
};

}  // namespace

std::unique_ptr<Balancer> make_balancer(const config::MoeConfig& config) {
  switch (config.balance_scope) {
    case config::BalanceScope::kMicroBatch:
      return std::make_unique<MicroBatchBalancer>(config);
    case config::BalanceScope::kSequence:
      return std::make_unique<SequenceBalancer>(config);
    case config::BalanceScope::kGlobalBatch:
      return std::make_unique<GlobalBatchBalancer>(config);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled balance scope");
}

}  // namespace yuanmoe::model
