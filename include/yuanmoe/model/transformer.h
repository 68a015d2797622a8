// The Yuan 2.0 decoder, all of it in one room, in the order a token meets it: RMSNorm, RoPE,
// Localized Filtering (LFA), attention, the pre-norm block, and the decoder (or one pipeline
// stage of it). The MoE feed-forward block is model/moe.h. docs/architecture.md gives the
// math and the parameter names. Sections in reading order; each keeps the comment of what it
// was.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/model/moe.h"

namespace yuanmoe::model {

// ================================================================================================
// layout: what the model needs to know about a micro-batch's tokens besides their ids. Packed
// samples (docs/data.md, "Batches") hold several documents; with data.reset_attention_mask a token
// sees only the earlier tokens of its own document, in the attention and in the LFA's filters.

/// What the model needs to know about a micro-batch's tokens besides their ids.
struct TokenLayout {
  Tensor position_ids_BS;  // int64 [B, S]: RoPE positions (reset after EOD when packing)
  Tensor document_ids_BS;  // int64 [B, S]: a token attends only to earlier tokens of its own
                           // document; undefined = one document per row (plain causal)

  TokenLayout() = default;
  /// Implicit from positions alone (decoding, tests): one document per row.
  TokenLayout(Tensor position_ids_BS, Tensor document_ids_BS = {})  // NOLINT
      : position_ids_BS(std::move(position_ids_BS)), document_ids_BS(std::move(document_ids_BS)) {}
};

/// Where query i may attend key j of the same row: j <= i and document_ids[j] == document_ids[i]
/// (block-diagonal causal). document_ids_BS int64 [B, S] -> bool [B, 1, S, S], true = attend.
Tensor document_causal_mask(const Tensor& document_ids_BS);

// ================================================================================================
// norm: RMSNorm (Yuan 2.0, arXiv 2311.15786): y = w * x / sqrt(mean(x^2) + eps), statistics in fp32.

/// x_BSD -> y_BSD, same dtype as x; one final rounding (Megatron/apex convention, docs/model.md §12.5).
class RmsNormImpl : public torch::nn::Module {
 public:
  RmsNormImpl(int64_t dim, double eps);
  Tensor forward(const Tensor& x);

  Tensor weight;  // [D], init 1
  const double eps;
};
TORCH_MODULE(RmsNorm);

// ================================================================================================
// rope: Partial rotary position embedding, NeoX "rotate-half" form (the Yuan2-M32-hf modelling code): the first
// rotary_dim dims of each head are rotated, pairing dim i with i + rotary_dim/2; the rest pass.
// Tables are computed in fp32 from exact integer positions (the default of docs/model.md §12.2); the other
// RopeTables modes reproduce the bf16 rounding of the HF or Megatron reference for parity checks.

/// theta_i = base^(-2i / rotary_dim), i in [0, rotary_dim/2). [rotary_dim/2] fp32 (rounded to
/// bf16 values in both bf16 modes).
Tensor rope_inverse_frequencies(int64_t rotary_dim, double base,
                                config::RopeTables tables = config::RopeTables::kExact);

/// cos/sin of position * theta for every token: each [B, S, 1, rotary_dim/2] fp32,
/// broadcastable over heads.
struct RopeAngles {
  Tensor cos;
  Tensor sin;
};
/// kHfBf16 rounds positions, angles and cos/sin to bf16 as the HF code does (positions above 256
/// are quantised: 257 -> 256); the tables stay fp32 tensors.
RopeAngles rope_angles(const Tensor& inverse_frequencies, const Tensor& position_ids_BS,
                       config::RopeTables tables = config::RopeTables::kExact);

/// Rotates x_BSHDh (any float dtype, computed in fp32) on its first rotary_dim dims.
Tensor apply_rope(const Tensor& x_BSHDh, const RopeAngles& angles, int64_t rotary_dim);
/// x_BSHn's last dim as `parts` equal slices (Yuan's per-head [q | k]), each rotated as
/// apply_rope does and returned as its own tensor.
std::vector<Tensor> apply_rope_to_parts(const Tensor& x_BSHn, const RopeAngles& angles, int64_t rotary_dim,
                                        int64_t parts);

/// NTK-aware base for stretching the context by `scale` (arXiv 2405.17976 §4.2):
/// b' = b * scale^(rotary_dim / (rotary_dim - 2)); 10000 at 4x, rotary_dim 128 -> 40890.
double ntk_scaled_rope_base(double base, double scale, int64_t rotary_dim);

// ================================================================================================
// lfa: Localized Filtering-based Attention (Yuan 2.0, arXiv 2311.15786).
// Two causal 2-tap convolutions over the sequence, D -> D/2 -> D, plus an RMSNorm residual:
//   y1[t] = W1c a[t] + W1p a[t-1] + b1,   y2[t] = W2c y1[t] + W2p y1[t-1] + b2,
//   lfa[t] = RMSNorm(y2[t] + a[t]),       a[-1] = y1[-1] = 0.
// The weights keep the reference Conv2d shape [out, in, 2, 1] (tap 0 = previous token, because
// PyTorch convolution is cross-correlation) so they map one-to-one onto the HF names. Packed
// documents are filtered across their boundaries, as in the reference, unless document ids are
// given (data.reset_attention_mask): then a[t-1] and y1[t-1] read zero at each document's first
// token, exactly as at the sequence start. Incremental decoding
// carries the previous frames in an LfaState (decode.h, docs/architecture.md, "Incremental decoding").

struct LfaState;  // decode.h

/// One causal 2-tap filter as a single GEMM: [x[t-1], x[t]] interleaved per channel matches the
/// memory order of weight [O, C, 2, 1] viewed as [O, 2C]. x_BSC -> y_BSO.
/// previous_B1C is x[-1], the frame before the chunk; undefined means a zero frame (sequence start).
/// With document_ids_BS (int64 [B, S]) x[t-1] also reads zero where token t starts a new document
/// (its id differs from token t-1's), so no document sees the one before it.
Tensor causal_two_tap(const Tensor& x_BSC,
                      const Tensor& weight_OC21,
                      const Tensor& bias_O,
                      const Tensor& previous_B1C = {},
                      const Tensor& document_ids_BS = {});

class LocalizedFilteringImpl : public torch::nn::Module {
 public:
  LocalizedFilteringImpl(int64_t hidden_size, double rms_norm_eps);
  /// a_BSD (the input-norm output) -> lfa_BSD. With a state, a_BSD continues the sequence the
  /// state has seen so far, and the state moves on to the end of this chunk. document_ids_BS:
  /// the filters restart at every document (see causal_two_tap); not with a state.
  Tensor forward(const Tensor& a_BSD, LfaState* state = nullptr, const Tensor& document_ids_BS = {});

  torch::nn::Conv2d conv1{nullptr};  // [D/2, D, 2, 1] + bias; kernel (2,1), padding (1,0)
  torch::nn::Conv2d conv2{nullptr};  // [D, D/2, 2, 1] + bias
  RmsNorm output_layernorm{nullptr};
};
TORCH_MODULE(LocalizedFiltering);

// ================================================================================================
// attention: Yuan 2.0 self-attention (arXiv 2311.15786; docs/model.md §2, §4): V reads the
// input-norm output a, Q and K read LFA(a); Q/K come from one per-head interleaved projection;
// partial RoPE; scale 1/sqrt(Dh);
// causal softmax; o_proj back to D. No biases. With a LayerCache (decode.h) a chunk attends to
// the cached keys and values of the tokens before it (incremental decoding, docs/architecture.md).

struct LayerCache;  // decode.h

/// softmax(q k^T / sqrt(Dh) + causal) v with queries q [B, H, Sq, Dh] and keys/values k, v
/// [B, H, Sk, Dh]; query i sits at key position offset + i and sees keys 0..offset + i
/// (offset = Sk - Sq when a chunk follows cached keys, 0 for a whole sequence). Dropout on the
/// probabilities when dropout_p > 0. Probabilities in fp32. Returns [B, H, Sq, Dh].
/// document_ids_BS (int64 [B, S], whole sequences only): query i sees only keys of its own
/// document (document_causal_mask).
Tensor causal_attention(const Tensor& q_BHSDh,
                        const Tensor& k_BHSDh,
                        const Tensor& v_BHSDh,
                        double dropout_p,
                        int64_t offset = 0,
                        const Tensor& document_ids_BS = {});

/// The same without dropout through at::scaled_dot_product_attention (libtorch's fused kernels:
/// flash attention on CPU; flash, memory-efficient or cuDNN on CUDA), for whole sequences
/// (Sq == Sk, offset 0): is_causal, or with document_ids_BS an explicit boolean block-diagonal
/// causal attn_mask (document_causal_mask; only the kernels that take a mask). The kernels
/// accumulate the softmax in fp32 whatever the inputs' dtype. Returns [B, H, S, Dh] in q's dtype.
Tensor sdpa_causal_attention(const Tensor& q_BHSDh,
                             const Tensor& k_BHSDh,
                             const Tensor& v_BHSDh,
                             const Tensor& document_ids_BS = {});

/// The causal attention core the model runs (and `yuanmoe bench` times): with `kernel` sdpa and
/// where it applies (no dropout, whole sequences) a fused kernel, causal_attention_cpu
/// (attention_cpu.h) for fp32 and fp64 on the CPU and sdpa_causal_attention elsewhere; else the
/// materialised reference. All take the document mask when document_ids_BS is given.
Tensor attention_core(config::AttentionKernel kernel,
                      const Tensor& q_BHSDh,
                      const Tensor& k_BHSDh,
                      const Tensor& v_BHSDh,
                      double dropout_p = 0.0,
                      int64_t offset = 0,
                      const Tensor& document_ids_BS = {});

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const config::ModelConfig& config);
  /// a_BSD: input-norm output; tokens: RoPE positions and, when defined, the document ids that
  /// mask the attention and the LFA. Returns [B, S, D].
  /// With a cache, a_BSD continues the cached sequence: its rotated keys and values are appended
  /// to the cache and its queries attend to every cached token before them (plain positions: no
  /// document ids with a cache).
  Tensor forward(const Tensor& a_BSD, const TokenLayout& tokens, LayerCache* cache = nullptr);

  const config::ModelConfig config;
  // Megatron's fused get_query_key [2P, D] is cut in two halves exactly like the HF converter:
  // q_proj holds the [q | k] rows of heads 0..H/2-1, k_proj those of heads H/2..H-1 (docs/model.md §4.1).
  torch::nn::Linear q_proj{nullptr};  // D -> P
  torch::nn::Linear k_proj{nullptr};  // D -> P
  torch::nn::Linear v_proj{nullptr};  // D -> P, heads contiguous
  torch::nn::Linear o_proj{nullptr};  // P -> D
  LocalizedFiltering lf_gate{nullptr};  // only with config.lfa

 private:
  /// inverse_frequencies_ on `device`, copied there once and kept: a copy per forward from host
  /// memory would make every attention layer wait for the transfer (core/host_sync.h).
  const Tensor& inverse_frequencies_on(const torch::Device& device);

  Tensor inverse_frequencies_;         // [rotary_dim / 2] fp32 on the CPU, not a parameter (HF: non-persistent)
  Tensor device_inverse_frequencies_;  // the same values on the device of the last forward
};
TORCH_MODULE(Attention);

// ================================================================================================
// block: One pre-norm decoder layer (Yuan 2.0, arXiv 2311.15786):
//   x = x + self_attn(input_layernorm(x))
//   x = x + mlp(post_attention_layernorm(x))      mlp: MoE, or dense SwiGLU (moe_layer_freq)

/// True when global layer `layer_index` has an MoE feed-forward block.
bool is_moe_layer(const config::MoeConfig& moe, int64_t layer_index);
/// How many of the global layers [first, end) are MoE layers.
int64_t count_moe_layers(const config::MoeConfig& moe, int64_t first, int64_t end);

struct LayerCache;  // decode.h

struct BlockOutput {
  Tensor x;         // [B, S, D]
  Tensor aux_loss;  // this layer's weighted router loss, undefined when none
  Tensor routed_pairs_E;  // int64 [E] routed pairs on MoE layers, undefined on dense ones
};

class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(const config::ModelConfig& model,
                       const config::MoeConfig& moe,
                       int64_t layer_index);
  /// x_BSD -> x_BSD. With a cache, x_BSD continues the sequence cached for this layer.
  BlockOutput forward(const Tensor& x_BSD,
                      const TokenLayout& tokens,
                      LayerCache* cache = nullptr);
  /// Activation recompute (model/recompute.h): what a rerun of the last forward must reuse (its
  /// router's global-batch statistics; undefined when none), and the rerun, which reuses it and
  /// adds nothing to the step's balancing statistics.
  Tensor rerun_record() const;
  void rerun_next_forward(const Tensor& record);

  const int64_t layer_index;  // global index: the parameter names use it
  RmsNorm input_layernorm{nullptr};
  Attention self_attn{nullptr};
  RmsNorm post_attention_layernorm{nullptr};
  Moe moe{nullptr};              // registered as "mlp" on MoE layers
  DenseMlp dense_mlp{nullptr};   // registered as "mlp" on dense layers
};
TORCH_MODULE(TransformerBlock);

// ================================================================================================
// transformer: The Yuan 2.0-M32 decoder, or one pipeline stage of it. Layers live in a ModuleDict keyed by
// their global index, so a stage holding layers 12..23 has the same parameter names as the whole
// model and checkpoints load under any pipeline layout.
//
// Parameter names (HF name = "model." + ours, except the grouped experts, see model/experts.h):
//   embed_tokens.weight                [V, D]
//   layers.{l}.input_layernorm.weight  [D]
//   layers.{l}.self_attn.{v,q,k}_proj.weight [P, D], o_proj.weight [D, P]
//   layers.{l}.self_attn.lf_gate.conv1.{weight,bias} [D/2, D, 2, 1], [D/2]
//   layers.{l}.self_attn.lf_gate.conv2.{weight,bias} [D, D/2, 2, 1], [D]
//   layers.{l}.self_attn.lf_gate.output_layernorm.weight [D]
//   layers.{l}.post_attention_layernorm.weight [D]
//   layers.{l}.mlp.gate.{query,key,value}.weight [E, D]  (attention router)
//   layers.{l}.mlp.gate.weight [E, D]                   (linear / relu / dense routers)
//   layers.{l}.mlp.experts.w1 [E, 2F, D], experts.w2 [E, D, F]
//   norm.weight [D];  lm_head.weight [V, D] only when embeddings are untied

struct DecodeCache;  // decode.h

/// The slice of the model one pipeline stage owns: layers [first_layer, end_layer), the
/// embedding on the first stage, final norm + head on the last.
struct StageSpec {
  int64_t first_layer = 0;
  int64_t end_layer = 0;
  bool has_embedding = true;
  bool has_head = true;
  static StageSpec whole_model(int64_t num_layers) { return {0, num_layers, true, true}; }

  /// Whether the stage holds an embedding matrix: the first stage's, or the last stage's own
  /// copy of a tied one (its gradient summed with the first's, as in Megatron).
  bool holds_embedding(bool tie_embeddings) const { return has_embedding || (has_head && tie_embeddings); }
  /// Whether `parameter`, a name in this stage, is the last stage's copy of a tied embedding:
  /// the first stage's counts once, in the gradient norm and in a checkpoint.
  bool holds_tied_copy(const std::string& parameter) const {
    return !has_embedding && parameter.rfind("embed_tokens.", 0) == 0;
  }
};

/// Layers [first, end) of pipeline stage `stage` of `stages`: contiguous; the first and last
/// stage get `first_layers` / `last_layers` when those are > 0, and the other stages share the
/// rest in sizes differing by at most one (earlier stages take the remainder). Embedding on the
/// first stage, head on the last.
StageSpec balanced_stage(int64_t num_layers, int64_t stages, int64_t stage, int64_t first_layers = 0,
                         int64_t last_layers = 0);

struct ModelOutput {
  Tensor out;       // logits [B, S, V] on the last stage, hidden [B, S, D] otherwise
  Tensor aux_loss;  // sum of this stage's weighted router losses; undefined when none
  Tensor routed_pairs_LE;  // int64 [MoE layers of this stage, E] routed pairs; undefined when none
};

class TransformerImpl : public torch::nn::Module {
 public:
  TransformerImpl(const config::ModelConfig& model, const config::MoeConfig& moe, StageSpec stage);
  TransformerImpl(const config::ModelConfig& model, const config::MoeConfig& moe)
      : TransformerImpl(model, moe, StageSpec::whole_model(model.num_layers)) {}

  /// input: token ids [B, S] (int64) on the first stage, hidden [B, S, D] otherwise.
  /// tokens: RoPE positions (reset after end-of-document when packing), document ids (packed
  /// documents masked from each other, data.reset_attention_mask); every stage of a pipeline
  /// gets the same layout. A Tensor converts to a layout of positions alone.
  /// cache: incremental decoding (decode.h). The input then continues the cached sequence, whose
  /// absolute positions the caller passes (cache->num_tokens + i for plain decoding); the cache
  /// holds one LayerCache per layer of this stage and moves on by S tokens.
  ModelOutput forward(const Tensor& input,
                      const TokenLayout& tokens,
                      DecodeCache* cache = nullptr);

  /// Every MoE layer of this stage, in layer order (for load statistics and router updates).
  std::vector<Moe> moe_layers() const;

  const config::ModelConfig config;
  const StageSpec stage;
  /// How a block runs while training with grad enabled, set from outside the model (e.g.
  /// apply_recompute, recompute.h); empty: a plain call. Decoding with a cache always calls the
  /// block itself (a rerun in backward would append to the cache twice).
  using BlockWrapper =
      std::function<BlockOutput(TransformerBlockImpl& block, const Tensor& x_BSD, const TokenLayout& tokens)>;
  BlockWrapper block_wrapper;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleDict layers{nullptr};
  std::vector<TransformerBlock> blocks;  // the same modules as `layers`, typed, in order
  RmsNorm norm{nullptr};
  torch::nn::Linear lm_head{nullptr};  // untied embeddings only
};
TORCH_MODULE(Transformer);

/// Positions 0..S-1 for every row. [B, S] int64.
Tensor default_position_ids(int64_t batch, int64_t seq, torch::Device device = torch::kCPU);

}  // namespace yuanmoe::model
