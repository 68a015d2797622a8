// MoE routers (docs/routers.md). A router turns the post-attention-norm hidden state into a
// Routing: per token K slots, each an (expert, gate) pair, plus its weighted auxiliary loss.
// The public forward() is the same for all: promote to fp32, score() -> fp32 logits, gate().
// Each router owns what balances it: its balancer (model/balancing.h), the aux-loss-free bias
// and the bias statistics of the optimizer step, or ReMoE's L1 coefficient.
//
//   kind       scorer                            gate                         balancing
//   attention  Yuan attention router             top-k softmax, renormalised  aux / z / bias
//   linear     W x                               top-k softmax, renormalised  aux / z / bias
//   relu       W x                               relu (variable experts)      adaptive L1 (ReMoE)
//   dense      W x                               softmax over all experts     none
#pragma once

#include <memory>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/balancing.h"

namespace yuanmoe::model {

struct Routing {
  Tensor expert_ids_TK;          // int64 [T, K]
  Tensor gates_TK;               // fp32 (or wider) [T, K]
  bool skip_zero_gates = false;  // ReLU: slots with gate exactly 0 are not dispatched
  Tensor aux_loss;               // weighted scalar, undefined when the router has none
};

/// What a router sees once per optimizer step (all micro-batches, summed over the world): this
/// layer's routed pairs per expert, its bias statistics, and the fraction of (token, expert)
/// pairs active over all MoE layers of the model (ReMoE's 1 - S_i, docs/routers.md).
struct RouterStepStats {
  Tensor routed_pairs_E;
  // step_bias_statistics() summed over the world, fp64 [E + 1]; undefined: the bias reads
  // routed_pairs_E.
  Tensor bias_statistics_E1;
  double active_fraction_all_layers = 0.0;
};

/// Sums over the tokens routed in eval mode since the last take_eval_stats(): the entropy (nats)
/// of each token's routing distribution (routing_distribution()), the token count, and the tokens
/// whose k-th and (k+1)-th largest routing weights (k = moe.top_k) are tied: within 1e-6, and
/// exactly equal. Top-k then chooses among the tied experts by position, not by anything the router
/// learned (docs/routers.md, "Ties").
/// For ReLU only ties between positive gates count: a zero gate is not routed.
struct RouterEvalStats {
  double entropy_sum = 0.0;
  int64_t tokens = 0;
  double tied_tokens = 0.0;
  double exactly_tied_tokens = 0.0;
};

/// Two weights closer than this are "tied" in RouterEvalStats.
inline constexpr double kRoutingTieTolerance = 1e-6;

/// p_TE (each token's routing distribution) -> fp64 [2]: the tokens whose k-th and (k+1)-th
/// largest weights are within kRoutingTieTolerance, and those exactly equal; zeros when E <= k.
/// `positive_only`: a tie counts only when both weights are above zero.
Tensor routing_tie_counts(const Tensor& p_TE, int64_t k, bool positive_only);

class RouterImpl : public torch::nn::Module {
 public:
  /// x_TD -> Routing, one sequence. Computed in fp32 (or double when x is
  /// double, for gradient checks). In eval mode it also adds to the entropy statistics (no
  /// grad, no host sync).
  Routing forward(const Tensor& x_TD);
  /// The same with the micro-batch's sequences (the sequence balancing scope's view).
  Routing forward(const Tensor& x_TD, const TokenGroups& tokens);

  /// The optimizer step's balancing state starts again: before the step's first micro-batch.
  virtual void begin_step() {}
  /// What this rank's training forwards of the step gave the bias update, fp64 [E + 1] on the
  /// router's device (zeros before any); undefined when the router has no bias.
  virtual Tensor step_bias_statistics() const { return Tensor(); }
  /// Once per optimizer step, from the world's figures: updates the router's buffers (if any).
  virtual void update_after_step(const RouterStepStats& stats) {}
  /// Activation recompute (model/recompute.h): what a rerun of the last forward must reuse
  /// (undefined: nothing), and the rerun itself, which adds nothing to the step's statistics.
  virtual Tensor rerun_record() const { return Tensor(); }
  void rerun_next_forward(const Tensor& record);

  /// The eval-mode statistics so far; resets them.
  RouterEvalStats take_eval_stats();
  /// logits_TE -> each token's distribution over experts [T, E], rows summing to 1 (or all 0):
  /// softmax for the softmax-gated routers (before any selection bias); ReLU gates normalised
  /// by their sum for ReMoE (a token with no active expert has an all-zero row, entropy 0).
  virtual Tensor routing_distribution(const Tensor& logits_TE) const;

  const config::MoeConfig config;

 protected:
  explicit RouterImpl(const config::MoeConfig& config) : config(config) {}
  /// x_TD (already promoted) -> logits_TE.
  virtual Tensor score(const Tensor& x_TD) = 0;
  /// logits_TE -> Routing. `rerun`: a recomputed forward (see rerun_next_forward).
  virtual Routing gate(const Tensor& logits_TE, const TokenGroups& tokens, bool rerun) = 0;
  /// A rerun is next: the router's own state to prepare.
  virtual void prepare_rerun(const Tensor& record) {}
  /// W x for the routers that score with one [E, D] matrix.
  static Tensor linear_scores(const Tensor& x_TD, const Tensor& weight_ED);

 private:
  bool rerun_ = false;
  // fp64 [3] on the router's device: entropy sum, tied tokens, exactly tied tokens; undefined
  // until first used.
  Tensor eval_sums_;
  int64_t eval_tokens_ = 0;
};

/// Shared by the attention and linear routers: top-k gates, the balancer's aux loss, z-loss and
/// the DeepSeek-V3 aux-loss-free selection bias.
class TopKRouterImpl : public RouterImpl {
 public:
  void begin_step() override;
  Tensor step_bias_statistics() const override;
  void update_after_step(const RouterStepStats& stats) override;
  Tensor rerun_record() const override { return balancer_->record(); }
  Balancer& balancer() { return *balancer_; }

  Tensor expert_bias;  // [E] buffer, selection only; stays 0 unless bias_balancing_rate > 0

 protected:
  TopKRouterImpl(const config::MoeConfig& config);
  Routing gate(const Tensor& logits_TE, const TokenGroups& tokens, bool rerun) override;
  void prepare_rerun(const Tensor& record) override { balancer_->rerun_next(record); }

 private:
  const bool has_bias_;  // moe.bias_balancing_rate > 0
  std::unique_ptr<Balancer> balancer_;
  Tensor step_bias_statistics_E1_;  // fp64 [E + 1], this rank, the step so far
};

/// Yuan 2.0-M32 attention router (arXiv 2405.17976): q, k, v = Wq x, Wk x, Wv x in R^E,
/// logits r = softmax_rows(q k^T) v, no 1/sqrt scaling. HF names mlp.gate.{query,key,value}.
class AttentionRouterImpl final : public TopKRouterImpl {
 public:
  AttentionRouterImpl(const config::MoeConfig& config, int64_t hidden_size);

  torch::nn::Linear query{nullptr};  // D -> E
  torch::nn::Linear key{nullptr};    // D -> E
  torch::nn::Linear value{nullptr};  // D -> E

 protected:
  Tensor score(const Tensor& x_TD) override;
};

/// Classic top-k softmax router (Mixtral / Megatron post-softmax). HF name mlp.gate.weight.
class LinearRouterImpl final : public TopKRouterImpl {
 public:
  LinearRouterImpl(const config::MoeConfig& config, int64_t hidden_size);
  Tensor weight;  // [E, D]

 protected:
  Tensor score(const Tensor& x_TD) override;
};

/// ReMoE (arXiv 2412.14711): gates relu(W x); loss term l1_coeff * load-balanced L1, with
/// l1_coeff adapted once per step toward 1 - top_k/E sparsity.
class ReluRouterImpl final : public RouterImpl {
 public:
  ReluRouterImpl(const config::MoeConfig& config, int64_t hidden_size);
  void update_after_step(const RouterStepStats& stats) override;
  Tensor routing_distribution(const Tensor& logits_TE) const override;

  Tensor weight;    // [E, D]
  Tensor l1_coeff;  // [] fp32 buffer (lambda), checkpointed

 protected:
  Tensor score(const Tensor& x_TD) override;
  Routing gate(const Tensor& logits_TE, const TokenGroups& tokens, bool rerun) override;
};

/// Jacobs et al. (1991) dense softmax gate: every expert runs on every token.
class DenseRouterImpl final : public RouterImpl {
 public:
  DenseRouterImpl(const config::MoeConfig& config, int64_t hidden_size);
  Tensor weight;  // [E, D]

 protected:
  Tensor score(const Tensor& x_TD) override;
  Routing gate(const Tensor& logits_TE, const TokenGroups& tokens, bool rerun) override;
};

/// The router selected by config.router.
std::shared_ptr<RouterImpl> make_router(const config::MoeConfig& config, int64_t hidden_size);

}  // namespace yuanmoe::model
