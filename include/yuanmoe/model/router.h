// MoE routers (reference/routers.md). A router turns the post-attention-norm hidden state into a
// Routing: per token K slots, each an (expert, gate) pair, plus its weighted auxiliary loss.
// The public forward() is the same for all: promote to fp32, score() -> fp32 logits, gate().
// Subclasses supply one scorer each; gating and balancing are the shared functions of gating.h.
//
//   kind       scorer                       gate                         balancing
//   attention  Yuan attention router (§2)   top-k softmax, renormalised  aux / z / bias
//   linear     W x                          top-k softmax, renormalised  aux / z / bias
//   relu       W x                          relu (variable experts)      adaptive L1 (ReMoE)
//   dense      W x                          softmax over all experts     none
#pragma once

#include <memory>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

struct Routing {
  Tensor expert_ids_TK;          // int64 [T, K]
  Tensor gates_TK;               // fp32 (or wider) [T, K]
  bool skip_zero_gates = false;  // ReLU: slots with gate exactly 0 are not dispatched
  Tensor aux_loss;               // weighted scalar, undefined when the router has none
};

/// What a router sees once per optimizer step (all micro-batches; global counts under data
/// parallelism): this layer's routed pairs per expert and the fraction of (token, expert) pairs
/// active over all MoE layers of the model (ReMoE's 1 - S_i, routers.md §3.2).
struct RouterStepStats {
  Tensor pairs_per_expert_E;
  int64_t tokens = 0;
  double active_fraction_all_layers = 0.0;
};

/// Sums over the tokens routed in eval mode since the last take_eval_stats(): the entropy (nats)
/// of each token's routing distribution (routing_distribution()), and the token count.
struct RouterEvalStats {
  double entropy_sum = 0.0;
  int64_t tokens = 0;
};

class RouterImpl : public torch::nn::Module {
 public:
  /// x_TD -> Routing. Computed in fp32 (or double when x is double, for gradient checks).
  /// In eval mode it also adds to the entropy statistics (no grad, no host sync).
  Routing forward(const Tensor& x_TD);
  /// Once per optimizer step, by whoever trains; updates the router's buffers (if any).
  virtual void update_after_step(const RouterStepStats& stats) {}
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
  virtual Routing gate(const Tensor& logits_TE) = 0;
  /// W x for the routers that score with one [E, D] matrix.
  static Tensor linear_scores(const Tensor& x_TD, const Tensor& weight_ED);

 private:
  Tensor eval_entropy_sum_;  // fp64 scalar on the router's device, undefined until first used
  int64_t eval_tokens_ = 0;
};

/// Shared by the attention and linear routers: top-k gates, Switch aux loss, z-loss and the
/// DeepSeek-V3 aux-loss-free selection bias.
class TopKRouterImpl : public RouterImpl {
 public:
  void update_after_step(const RouterStepStats& stats) override;

  Tensor expert_bias;  // [E] buffer, selection only; stays 0 unless bias_balancing_rate > 0

 protected:
  TopKRouterImpl(const config::MoeConfig& config);
  Routing gate(const Tensor& logits_TE) override;
};

/// Yuan 2.0-M32 attention router (yuan2-m32.md §5): q, k, v = Wq x, Wk x, Wv x in R^E,
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
  Routing gate(const Tensor& logits_TE) override;
};

/// Jacobs et al. (1991) dense softmax gate: every expert runs on every token.
class DenseRouterImpl final : public RouterImpl {
 public:
  DenseRouterImpl(const config::MoeConfig& config, int64_t hidden_size);
  Tensor weight;  // [E, D]

 protected:
  Tensor score(const Tensor& x_TD) override;
  Routing gate(const Tensor& logits_TE) override;
};

/// The router selected by config.router.
std::shared_ptr<RouterImpl> make_router(const config::MoeConfig& config, int64_t hidden_size);

/// ReMoE controller (routers.md §3.2): lambda * alpha when too many pairs are active
/// (sparsity below target), lambda / alpha otherwise (the reference also divides at equality).
double next_relu_l1_coeff(double coeff, double active_fraction, double target_active, double alpha);

/// Aux-loss-free bias step (routers.md §7, torchtitan's centred form):
/// delta = rate * sign(mean(c) - c), minus its mean. [E].
Tensor expert_bias_delta(const Tensor& pairs_per_expert_E, double rate);

}  // namespace yuanmoe::model
