// The MoE feed-forward block, all of it in one room: the gating and balancing functions every
// router shares (docs/routers.md), the four routers (one scorer each), the experts as one
// autograd function over grouped GEMMs (and the dense SwiGLU of non-MoE layers), and the block
// itself: route, plan (sort by expert), gather, grouped GEMMs, deterministic combine.
// Sections in reading order; each keeps the comment of what it was.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

// ================================================================================================
// gating: Gating and balancing functions shared by every router (docs/routers.md). Pure functions of
// fp32 router logits; no module state. Logits are [T, E].

/// Top-k selection with renormalised softmax gates (docs/routers.md): the k largest of
/// logits + selection_bias are selected (the bias only selects: DeepSeek-V3, arXiv 2412.19437
/// §2.1.2; pass an undefined tensor for none), and the gates are softmax over the k unbiased
/// selected logits, which equals softmax-then-renormalise. For k = 1 the gate is the raw softmax probability (Switch form):
/// a renormalised single gate is always 1 and would give the router no gradient.
struct TopKGates {
  Tensor gates_TK;       // fp32, each row sums to 1 (k > 1)
  Tensor expert_ids_TK;  // int64
};
TopKGates top_k_gates(const Tensor& logits_TE, int64_t k, const Tensor& selection_bias_E);

/// ReMoE gates (docs/routers.md): relu(logits), no normalisation. [T, E].
Tensor relu_gates(const Tensor& logits_TE);

/// Jacobs et al. 1991 gates (docs/routers.md): softmax over all experts. [T, E].
Tensor dense_gates(const Tensor& logits_TE);

/// Switch load-balancing loss (docs/routers.md), top-k form of Megatron:
/// E * sum_i f_i P_i with f_i = (1/(T k)) sum_t 1{i in S_t} (no gradient), P_i = mean_t softmax_i.
/// Equals 1 at perfect balance; the caller multiplies by aux_loss_coeff.
Tensor switch_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK);

/// What the balancing terms of one micro-batch see besides the logits (docs/routers.md,
/// "Balancing scope").
struct BalanceInput {
  Tensor counted_T;       // bool [T]: tokens whose label counts; undefined = every token counts
  int64_t sequences = 1;  // the T rows are this many sequences of T / sequences tokens, in order
  // moe.balance_scope = global_batch: this micro-batch's counted routed pairs per expert and its
  // counted tokens, fp64 [E + 1] -> the step's fractions f_E and the counted tokens per rank of
  // this micro-batch, fp64 [E + 1] (MoeImpl reduces over the data-parallel ranks and
  // accumulates over the step's micro-batches). Empty: this micro-batch alone.
  std::function<Tensor(const Tensor&)> global_statistics;
};

/// Routed pairs per expert of the counted tokens (undefined counted_T: all), then the number of
/// counted tokens: fp64 [E + 1], no grad.
Tensor counted_routed_pairs(const Tensor& expert_ids_TK, const Tensor& counted_T, int64_t experts);

/// The Switch loss above over the counted tokens only (bool [T]): f from their pairs, P their
/// mean probability. 0 when no token counts.
Tensor switch_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const Tensor& counted_T);

/// DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437 §2.1.2, eq. 17-20) with softmax
/// probabilities: per sequence s, E * sum_i f_si P_si with f_si = (1/(T_s k)) sum_t 1{i in S_t}
/// (no grad) and P_si = (1/T_s) sum_t softmax_i over its T_s counted tokens; the mean over the
/// sequences that have a counted token. The rows are `sequences` sequences of equal length, in order.
Tensor sequence_load_balancing_loss(const Tensor& logits_TE, const Tensor& expert_ids_TK, const Tensor& counted_T,
                                    int64_t sequences);

/// Global-batch balance loss (Megatron-Core's global_aux_loss; docs/routers.md): this rank's
/// share E * sum_i f_i * (sum_t softmax_ti) / tokens_per_rank, the sum over its counted tokens,
/// with f_E the step's global fractions (no grad) and tokens_per_rank the micro-batch's counted
/// tokens over all ranks divided by the ranks: the mean over the ranks is the one-process loss.
Tensor global_batch_load_balancing_loss(const Tensor& logits_TE, const Tensor& counted_T, const Tensor& fraction_E,
                                        const Tensor& tokens_per_rank);

/// ST-MoE router z-loss (docs/routers.md): mean_t (logsumexp_j logits_tj)^2.
Tensor router_z_loss(const Tensor& logits_TE);

/// ReMoE load-balanced L1 (docs/routers.md): (1/T) sum_t sum_e f_e R_te with
/// f_e = sg(E / (k T) * sum_t 1{R_te > 0}). The caller multiplies by the adaptive lambda.
Tensor relu_load_balanced_l1(const Tensor& gates_TE, int64_t k);

// ================================================================================================
// router: MoE routers (docs/routers.md). A router turns the post-attention-norm hidden state into a
// Routing: per token K slots, each an (expert, gate) pair, plus its weighted auxiliary loss.
// The public forward() is the same for all: promote to fp32, score() -> fp32 logits, gate().
// Subclasses supply one scorer each; gating and balancing are the shared functions of gating.h.
//
//   kind       scorer                       gate                         balancing
//   attention  Yuan attention router (docs/routers.md)   top-k softmax, renormalised  aux / z / bias
//   linear     W x                          top-k softmax, renormalised  aux / z / bias
//   relu       W x                          relu (variable experts)      adaptive L1 (ReMoE)
//   dense      W x                          softmax over all experts     none

struct Routing {
  Tensor expert_ids_TK;          // int64 [T, K]
  Tensor gates_TK;               // fp32 (or wider) [T, K]
  bool skip_zero_gates = false;  // ReLU: slots with gate exactly 0 are not dispatched
  Tensor aux_loss;               // weighted scalar, undefined when the router has none
};

/// What a router sees once per optimizer step (all micro-batches; global counts under data
/// parallelism): this layer's routed pairs per expert and the fraction of (token, expert) pairs
/// active over all MoE layers of the model (ReMoE's 1 - S_i, docs/routers.md).
struct RouterStepStats {
  Tensor routed_pairs_E;
  // The step's bias statistics summed over the world (MoeImpl::step_bias_statistics), fp64
  // [E + 1]; undefined: the bias reads routed_pairs_E.
  Tensor bias_statistics_E;
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
  /// The same with the micro-batch's balancing context (counted tokens, sequences, global statistics).
  Routing forward(const Tensor& x_TD, const BalanceInput& balance);
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
  virtual Routing gate(const Tensor& logits_TE, const BalanceInput& balance) = 0;
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
  Routing gate(const Tensor& logits_TE, const BalanceInput& balance) override;
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
  Routing gate(const Tensor& logits_TE, const BalanceInput& balance) override;
};

/// Jacobs et al. (1991) dense softmax gate: every expert runs on every token.
class DenseRouterImpl final : public RouterImpl {
 public:
  DenseRouterImpl(const config::MoeConfig& config, int64_t hidden_size);
  Tensor weight;  // [E, D]

 protected:
  Tensor score(const Tensor& x_TD) override;
  Routing gate(const Tensor& logits_TE, const BalanceInput& balance) override;
};

/// The router selected by config.router.
std::shared_ptr<RouterImpl> make_router(const config::MoeConfig& config, int64_t hidden_size);

/// ReMoE controller (docs/routers.md): lambda * alpha when too many pairs are active
/// (sparsity below target), lambda / alpha otherwise (the reference also divides at equality).
double next_relu_l1_coeff(double coeff, double active_fraction, double target_active, double alpha);

/// Aux-loss-free bias step (docs/routers.md, torchtitan's centred form):
/// delta = rate * sign(mean(c) - c), minus its mean. [E].
Tensor expert_bias_delta(const Tensor& routed_pairs_E, double rate);

/// Per sequence, the sign of its load error: sign(mean_i c_si - c_si) for the rows of
/// pairs_SE (routed pairs per sequence and expert) that have pairs, summed over those rows;
/// then their number: fp64 [E + 1] (moe.balance_scope = sequence, docs/routers.md).
Tensor sequence_load_error_signs(const Tensor& pairs_SE);

/// The bias step of moe.balance_scope = sequence: delta = rate * (the mean over sequences of
/// their load-error signs), minus its mean. sign_sums_E1 as sequence_load_error_signs; [E].
Tensor sequence_expert_bias_delta(const Tensor& sign_sums_E1, double rate);

// ================================================================================================
// mlp: SwiGLU feed-forward math shared by the experts and the dense layers (Shazeer 2020, arXiv 2002.05202):
//   u = W1 x (W1: [2F, D], gate rows first), h = silu(u[:F]) * u[F:], out = W2 h (W2: [D, F]).
// Not Yuan's dense YuanMLP, which puts the activation on the up projection.

/// x_TD, w1_2FD, w2_DF -> out_TD.
Tensor swiglu(const Tensor& x_TD, const Tensor& w1_2FD, const Tensor& w2_DF);

/// A dense SwiGLU layer (layers that moe.moe_layer_freq leaves dense).
class DenseMlpImpl : public torch::nn::Module {
 public:
  DenseMlpImpl(int64_t hidden_size, int64_t ffn_hidden_size);
  Tensor forward(const Tensor& x);  // [..., D] -> [..., D]

  torch::nn::Linear w1{nullptr};  // D -> 2F
  torch::nn::Linear w2{nullptr};  // F -> D
};
TORCH_MODULE(DenseMlp);

/// All experts of one MoE layer as two grouped weights (Megatron GroupedMLP layout);
/// HF `experts.{e}.w1.weight` is `w1[e]`, `experts.{e}.w2.weight` is `w2[e]`.
class GroupedExpertsImpl : public torch::nn::Module {
 public:
  GroupedExpertsImpl(int64_t num_experts, int64_t hidden_size, int64_t ffn_hidden_size);
  /// xs_ND: routed rows sorted by expert, rows_per_expert[e] of them for expert e in order.
  /// One contiguous GEMM pair per non-empty expert. Returns ys_ND.
  Tensor forward(const Tensor& xs_ND, const std::vector<int64_t>& rows_per_expert);
  /// The same through at::_grouped_mm, the blocks given by their end rows on the device
  /// (expert_offsets_E, int32): no host synchronisation. Autograd through libtorch's kernels.
  Tensor forward_grouped_mm(const Tensor& xs_ND, const Tensor& expert_offsets_E);

  Tensor w1;  // [E, 2F, D]
  Tensor w2;  // [E, D, F]
};
TORCH_MODULE(GroupedExperts);

// ================================================================================================
// moe: The MoE feed-forward block (arXiv 2405.17976; docs/architecture.md): route, group the routed
// (token, slot) pairs by expert with a stable sort, run one contiguous GEMM pair per expert,
// scale by the gates, and combine deterministically: every pair writes its own (token, slot)
// row (unique destinations, no atomics) and the K slots are summed in a fixed order.
// Dropless by default; capacity_factor > 0 drops the overflow of each expert in batch order.

struct MoeOutput {
  Tensor out;       // same shape as the input
  Tensor aux_loss;  // weighted router loss of this layer, undefined when none
  // Routed (token, expert) pairs per expert before capacity drops, int64 [E], no grad. Returned
  // rather than accumulated in the module, so a recomputed forward (activation checkpointing)
  // cannot count a batch twice; the trainer sums it over micro-batches.
  Tensor routed_pairs_E;
};

/// Where each routed (token, slot) pair goes: the pairs that are computed, grouped by expert.
/// Pair p is slot p % K of token p / K.
struct DispatchPlan {
  Tensor pair_ids_N;                   // int64 [N], sorted by expert, batch order inside an expert
  Tensor gates_N;                      // [N], the gate of each pair in that order
  std::vector<int64_t> rows_per_expert;  // [E] on the host: it sizes the loop's GEMMs (empty for grouped_mm)
  Tensor expert_offsets_E;             // int32 [E], on the device: the end row of each expert's block
  Tensor routed_pairs_E;               // int64 [E] pairs the router asked for, before capacity drops
  int64_t tokens = 0, slots = 0;
};

/// The ranks one MoE layer's experts are spread over (expert parallelism, docs/parallelism.md):
/// rank r of size() holds experts [r * E / size(), (r + 1) * E / size()). Implemented over a
/// c10d group by parallel/expert_parallel.h; the model sees only this interface.
class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int64_t size() const = 0;
  /// Rows per expert this rank sends, int64 [E] -> rows each rank sends to this rank's experts,
  /// [size() * E / size()]: entry r * L + e from rank r for local expert e.
  virtual Tensor exchange_counts(const Tensor& rows_per_expert_E) const = 0;
  /// rows [N, ...]: the first send_rows[0] rows to rank 0, the next send_rows[1] to rank 1, ...;
  /// returns the rows received, recv_rows[r] from rank r, in rank order. Differentiable: the
  /// gradient goes back the way the rows came.
  virtual Tensor dispatch(const Tensor& rows, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) const = 0;
  /// The experts' outputs back to the ranks their rows came from (the splits of dispatch, swapped).
  virtual Tensor combine(const Tensor& rows, const std::vector<int64_t>& send_rows,
                         const std::vector<int64_t>& recv_rows) const = 0;
};

/// The ranks whose balancing statistics a router sums (moe.balance_scope = global_batch,
/// docs/routers.md): every data-parallel rank of the stage, expert-parallel ones included (for
/// the router they are data-parallel). Implemented over a c10d group by
/// parallel/balance_reducer.h; the model sees only this interface; none: one process.
class BalanceReducer {
 public:
  virtual ~BalanceReducer() = default;
  virtual int64_t size() const = 0;
  /// Element-wise sum over the ranks, in place; every rank calls it with the same shape.
  virtual void sum(Tensor& tensor) const = 0;
};

class MoeImpl : public torch::nn::Module {
 public:
  MoeImpl(const config::MoeConfig& config, int64_t hidden_size);
  /// x [..., D] -> out [..., D]: route, plan, gather, experts (here, or on their ranks), combine.
  /// counted: bool with x's leading shape ([B, S] for x [B, S, D], [T] for x [T, D]), the tokens
  /// whose label counts: only they enter the balancing statistics; undefined = all. The
  /// sequence scope reads the sequences from x's [B, S, D] shape ([T, D]: one sequence).
  MoeOutput forward(const Tensor& x, const Tensor& counted = {});

  // The stages of forward(), public so that `yuanmoe bench` can time each one.
  /// host_rows: also copy the row counts to the host (the loop's GEMMs need them; a sync).
  DispatchPlan plan(const Routing& routing, int64_t tokens, bool host_rows = true) const;
  /// Whether the experts run through at::_grouped_mm for input x (moe.expert_gemm).
  bool uses_grouped_mm(const Tensor& x) const;
  /// x_TD -> the planned pairs' inputs [N, D].
  static Tensor gather(const Tensor& x_TD, const DispatchPlan& plan);
  /// Expert outputs [N, D] -> out [T, D]: scaled by the gates, each pair written to its own
  /// (token, slot) row, the K slots summed in order.
  static Tensor combine(const Tensor& ys_ND, const DispatchPlan& plan);
  /// The planned pairs' inputs [N, D] (sorted by global expert) -> their expert outputs [N, D]:
  /// the experts of this rank, or under expert parallelism each block of rows sent to the rank
  /// holding its experts and the outputs sent back.
  Tensor run_experts(const Tensor& xs_ND, const DispatchPlan& plan);

  const config::MoeConfig config;
  std::shared_ptr<RouterImpl> gate;  // HF name: mlp.gate
  GroupedExperts experts{nullptr};   // HF names: mlp.experts.{e}.w1 / w2 (this rank's experts)
  /// Set by parallel::apply_expert_parallel; null: this rank holds all moe.num_experts experts.
  std::shared_ptr<const ExpertExchange> expert_exchange;
  /// Set by parallel::apply_balance_reducer (global_batch scope); null: one rank.
  std::shared_ptr<const BalanceReducer> balance_reducer;

  /// The optimizer step's balancing statistics (docs/routers.md, "Balancing scope") start
  /// again: called before the step's first micro-batch (train/step.cpp).
  void begin_step();
  /// What this rank's training forwards of the step gave the bias update, fp64 [E + 1]: counted
  /// routed pairs per expert and counted tokens (sequence scope: sequence_load_error_signs
  /// summed); zeros before any. Kept only when moe.bias_balancing_rate > 0.
  Tensor step_bias_statistics() const;
  /// Activation recompute (model/recompute.h): the global-batch statistics the last forward
  /// used (undefined when it used none), and the rerun of a forward: the next forward reuses
  /// `record` instead of reducing (no collective) and adds nothing to the step's statistics, so
  /// a rerun sees the f of its first run and counts nothing twice.
  Tensor last_balance_record() const { return balance_record_; }
  void rerun_next_forward(const Tensor& record);

 private:
  Tensor global_statistics(const Tensor& local_E1, bool rerun);
  void add_bias_statistics(const Tensor& expert_ids_TK, const BalanceInput& balance);
  Tensor step_global_counts_;  // fp64 [E + 1]: counted pairs per expert and tokens, all ranks, the step so far
  Tensor step_bias_statistics_;  // fp64 [E + 1], this rank
  Tensor balance_record_;        // fp64 [E + 1]: f_E and tokens per rank of the last forward
  bool rerun_ = false;
  Tensor rerun_record_;
  Tensor run_local_experts(const Tensor& xs_ND, const std::vector<int64_t>& rows_per_expert,
                           const Tensor& expert_offsets_E);
  Tensor run_experts_across_ranks(const Tensor& xs_ND, const DispatchPlan& plan);
};
TORCH_MODULE(Moe);

}  // namespace yuanmoe::model
