// Gating and load balancing (docs/routers.md): the gate functions every router shares, the
// balancing losses and bias steps as pure functions of fp32 router logits, and one Balancer per
// moe.balance_scope (made by make_balancer, the one place the scope is switched on). A top-k
// router owns one; the global-batch balancer also owns its reduction over the data-parallel
// ranks, the step's counts and what a recomputed forward must reuse.
#pragma once

#include <memory>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

// ------------------------------------------------------------------------------------------------
// Gates. Logits are [T, E].

/// Top-k selection with renormalised softmax gates (docs/routers.md): the k largest of
/// logits + selection_bias are selected (the bias only selects: DeepSeek-V3, arXiv 2412.19437
/// §2.1.2; pass an undefined tensor for none), and the gates are softmax over the k unbiased
/// selected logits, which equals softmax-then-renormalise. For k = 1 the gate is the raw softmax
/// probability (Switch form): a renormalised single gate is always 1 and would give the router
/// no gradient.
struct TopKGates {
  Tensor gates_TK;       // fp32, each row sums to 1 (k > 1)
  Tensor expert_ids_TK;  // int64
};
TopKGates top_k_gates(const Tensor& logits_TE, int64_t k, const Tensor& selection_bias_E);

/// ReMoE gates (docs/routers.md): relu(logits), no normalisation. [T, E].
Tensor relu_gates(const Tensor& logits_TE);

/// Jacobs et al. 1991 gates (docs/routers.md): softmax over all experts. [T, E].
Tensor dense_gates(const Tensor& logits_TE);

// ------------------------------------------------------------------------------------------------
// Balancing losses.

/// Switch load-balancing loss (docs/routers.md), top-k form of Megatron:
/// E * sum_i f_i P_i with f_i = (1/(T k)) sum_t 1{i in S_t} (no gradient), P_i = mean_t softmax_i.
/// Equals 1 at perfect balance; the caller multiplies by aux_loss_coeff.
Tensor switch_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK);

/// DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437 §2.1.2, eq. 17-20) with softmax
/// probabilities: per sequence s, E * sum_i f_si P_si with f_si = (1/(T_s k)) sum_t 1{i in S_t}
/// (no grad) and P_si = (1/T_s) sum_t softmax_i over its T_s tokens; the mean over the sequences.
/// The rows are `sequences` sequences of equal length, in order.
Tensor sequence_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, int64_t sequences);

/// Global-batch balance loss (Megatron-Core's global_aux_loss; docs/routers.md): this rank's
/// share E * sum_i f_i * (sum_t softmax_ti) / tokens_per_rank, the sum over its tokens, with f_E
/// the step's global fractions (no grad) and tokens_per_rank the micro-batch's tokens over all
/// ranks divided by the ranks: the mean over the ranks is the one-process loss.
Tensor global_batch_load_balancing_loss(const Tensor& logits_TE, const Tensor& fraction_E,
                                        const Tensor& tokens_per_rank);

/// ST-MoE router z-loss (docs/routers.md): mean_t (logsumexp_j logits_tj)^2.
Tensor router_z_loss(const Tensor& logits_TE);

/// ReMoE load-balanced L1 (docs/routers.md): (1/T) sum_t sum_e f_e R_te with
/// f_e = sg(E / (k T) * sum_t 1{R_te > 0}). The caller multiplies by the adaptive lambda.
Tensor relu_load_balanced_l1(const Tensor& gates_TE, int64_t k);

/// ReMoE controller (docs/routers.md): lambda * alpha when too many pairs are active
/// (sparsity below target), lambda / alpha otherwise (the reference also divides at equality).
double next_relu_l1_coeff(double coeff, double active_fraction, double target_active, double alpha);

// ------------------------------------------------------------------------------------------------
// Balancing statistics and the aux-loss-free bias step. Rows written _E1 are [E + 1]: one value
// per expert, then a count.

/// Routed pairs per expert, then the number of tokens: fp64 [E + 1], no grad.
Tensor routed_pairs_and_tokens(const Tensor& expert_ids_TK, int64_t experts);

/// Aux-loss-free bias step (docs/routers.md, torchtitan's centred form):
/// delta = rate * sign(mean(c) - c), minus its mean. [E].
Tensor expert_bias_delta(const Tensor& routed_pairs_E, double rate);

/// Per sequence, the sign of its load error: sign(mean_i c_bi - c_bi) for the rows of
/// pairs_BE (routed pairs per sequence and expert) that have pairs, summed over those rows;
/// then their number: fp64 [E + 1] (moe.balance_scope = sequence, docs/routers.md).
Tensor sequence_load_error_signs(const Tensor& pairs_BE);

/// The bias step of moe.balance_scope = sequence: delta = rate * (the mean over sequences of
/// their load-error signs), minus its mean. sign_sums_E1 as sequence_load_error_signs; [E].
Tensor sequence_expert_bias_delta(const Tensor& sign_sums_E1, double rate);

// ------------------------------------------------------------------------------------------------
// Balancers: one per moe.balance_scope (docs/routers.md, "Balancing scope").

/// How a micro-batch's tokens split into sequences. Every routed token counts in the balancing
/// terms, a prompt token that the SFT loss mask ignores too: the experts compute it all the same.
struct TokenGroups {
  int64_t sequences = 1;  // the T rows are this many sequences of T / sequences tokens, in order
};

/// The ranks whose statistics the global-batch balancer sums: every data-parallel rank of the
/// stage, expert-parallel ones included (for the router they are data-parallel). Implemented
/// over a c10d group by parallel/balance_reducer.h.
class StatisticsReducer {
 public:
  virtual ~StatisticsReducer() = default;
  virtual int64_t size() const = 0;
  /// Element-wise sum over the ranks, in place; every rank calls it with the same shape.
  virtual void sum(Tensor& tensor) const = 0;
};

class Balancer {
 public:
  virtual ~Balancer() = default;
  /// The balance loss of one micro-batch's routing, before aux_loss_coeff.
  virtual Tensor loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const TokenGroups& tokens) = 0;
  /// What one micro-batch adds to the step's bias statistics: fp64 [E + 1], no grad.
  virtual Tensor bias_statistics(const Tensor& expert_ids_TK, const TokenGroups& tokens) const;
  /// The bias step from the step's statistics summed over the world. [E].
  virtual Tensor bias_delta(const Tensor& statistics_E1, double rate) const;

  /// A new optimizer step: statistics kept over the step start again.
  virtual void begin_step() {}
  /// The global-batch balancer sums over these ranks (parallel/balance_reducer.h); null: one rank.
  virtual void set_reducer(std::shared_ptr<const StatisticsReducer> reducer) {}
  /// Activation recompute (model/recompute.h): what the last loss() used that a rerun must see
  /// again (undefined: nothing), and the rerun itself: the next loss() reuses `record` instead
  /// of reducing (no collective) and adds nothing to the step's statistics.
  virtual Tensor record() const { return Tensor(); }
  virtual void rerun_next(const Tensor& record) {}

 protected:
  explicit Balancer(const config::MoeConfig& config) : experts_(config.num_experts), top_k_(config.top_k) {}
  const int64_t experts_, top_k_;
};

/// The balancer of config.balance_scope.
std::unique_ptr<Balancer> make_balancer(const config::MoeConfig& config);

}  // namespace yuanmoe::model
