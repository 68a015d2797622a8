// Typed run configuration (docs/config.md): one struct per JSON section, one root RunConfig.
// Parsing, serialisation and key documentation all come from the single schema in
// src/config/schema.h, so a key exists in exactly one place. Nothing below the config
// layer sees JSON or enum strings; each module receives only its own section.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace yuanmoe::config {

enum class RouterKind { kAttention, kLinear, kRelu, kDense };
/// The routers that select k experts per token with softmax gates (and so balance with the aux
/// loss, the z-loss and the selection bias): attention and linear.
inline bool is_top_k_router(RouterKind kind) { return kind == RouterKind::kAttention || kind == RouterKind::kLinear; }
/// How RoPE cos/sin tables are computed (docs/interop.md: the HF and Megatron references round them in bf16): exact fp32 from integer positions,
/// or reproducing a reference's bf16 rounding for parity checks.
enum class RopeTables { kExact, kHfBf16, kMegatronBf16 };
enum class AttentionKernel { kSdpa, kMaterialised };
/// How the experts' GEMMs run (model/moe.h): auto = at::_grouped_mm on CUDA in bf16, else the loop.
enum class ExpertGemm { kAuto, kLoop, kGroupedMm };
/// Over which tokens the balancing statistics are taken (docs/routers.md, "Balancing scope").
enum class BalanceScope { kMicroBatch, kSequence, kGlobalBatch };
enum class LrSchedule { kCosine, kConstant, kLinear };
enum class Precision { kFp32, kBf16, kFp64 };
enum class PipelineSchedule { k1F1B, kGPipe };
enum class Backend { kAuto, kGloo, kNccl };
enum class NonfinitePolicy { kStop, kSkip };
/// Which labels the LM loss ignores: none, or the instruction of every SFT sample (docs/data.md).
enum class LossMask { kNone, kSft };
/// How the LM loss averages its counted labels over a step (docs/training.md, "Loss").
enum class LossAverage { kToken, kMicroBatch };

/// Decoder architecture (Yuan 2.0, arXiv 2311.15786; Yuan 2.0-M32, arXiv 2405.17976).
struct ModelConfig {
  int64_t num_layers = 0;           ///< L, required
  int64_t hidden_size = 0;          ///< D, required
  int64_t num_attention_heads = 0;  ///< heads for Q, K and V (no GQA), required
  int64_t head_dim = 0;             ///< Dh; Yuan uses 2*hidden/heads, so P = H*Dh may differ from D
  int64_t rotary_dim = 0;           ///< leading dims of each head that RoPE rotates (even, <= Dh)
  double rope_base = 10000.0;       ///< RoPE theta base; 40890 for the 16K fine-tune
  RopeTables rope_tables = RopeTables::kExact;
  int64_t vocab_size = 0;           ///< V, required
  int64_t max_seq_length = 0;       ///< longest sequence the model is meant for, required
  double rms_norm_eps = 1e-6;
  bool tie_embeddings = true;       ///< output head reuses embed_tokens.weight
  bool lfa = true;                  ///< Localized Filtering-based Attention on Q/K input
  double init_std = 0.02;           ///< N(0, init_std); output projections scaled by 1/sqrt(2L)
  double attention_dropout = 0.0;   ///< dropout on attention probabilities while training
  AttentionKernel attention = AttentionKernel::kSdpa;  ///< causal attention kernel (transformer.cpp)

  /// Attention width P = heads * head_dim.
  int64_t attention_width() const { return num_attention_heads * head_dim; }
};

/// Mixture-of-Experts feed-forward blocks and their routers (docs/routers.md).
struct MoeConfig {
  int64_t num_experts = 0;           ///< E, required
  int64_t top_k = 0;                 ///< K; ReLU: sets the target sparsity 1 - K/E
  int64_t ffn_hidden_size = 0;       ///< F, expert SwiGLU width, required
  RouterKind router = RouterKind::kAttention;
  double aux_loss_coeff = 0.0;       ///< Switch load-balancing loss (top-k routers)
  double z_loss_coeff = 0.0;         ///< ST-MoE router z-loss (top-k routers)
  double bias_balancing_rate = 0.0;  ///< DeepSeek-V3 aux-loss-free bias update rate, 0 = off
  BalanceScope balance_scope = BalanceScope::kMicroBatch;  ///< aux loss and bias statistics scope
  double relu_l1_init = 1e-8;        ///< ReMoE lambda_0
  double relu_l1_alpha = 1.2;        ///< ReMoE lambda multiplier per optimizer step
  double capacity_factor = 0.0;      ///< 0 = dropless
  int64_t moe_layer_freq = 1;        ///< layer l is MoE iff l % freq == 0; others dense SwiGLU
  int64_t dense_ffn_hidden_size = 0; ///< width of dense layers; 0 = top_k * ffn_hidden_size
  ExpertGemm expert_gemm = ExpertGemm::kAuto;

  /// SwiGLU width of the dense layers: same active FLOPs as an MoE layer unless set.
  int64_t dense_layer_ffn_size() const {
    return dense_ffn_hidden_size > 0 ? dense_ffn_hidden_size : top_k * ffn_hidden_size;
  }
};

struct TrainConfig {
  int64_t seq_length = 0;  ///< required
  int64_t micro_batch_size = 1;
  int64_t global_batch_size = 1;
  int64_t max_steps = 0;   ///< required
  double lr = 3e-4;
  double min_lr = 3e-5;
  int64_t warmup_steps = 0;
  LrSchedule lr_schedule = LrSchedule::kCosine;
  double weight_decay = 0.1;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;
  int64_t seed = 1234;
  Precision precision = Precision::kFp32;
  bool recompute = false;
  std::string init_from;   ///< checkpoint dir whose weights start a fine-tune; empty = none
  /// A step whose loss or gradient norm is not finite: stop the run (nothing of it applied), or
  /// skip it (batch consumed, no update) up to max_consecutive_skips in a row (Megatron skips
  /// such iterations under loss scaling).
  NonfinitePolicy on_nonfinite = NonfinitePolicy::kStop;
  int64_t max_consecutive_skips = 5;
  int64_t eval_interval = 0;  ///< 0 = evaluate only at the end
  int64_t eval_steps = 10;
  /// token: the sum of the counted labels' losses over the global batch / their count
  /// (Megatron-Core's --calculate-per-token-loss); micro_batch: the mean of the micro-batches'
  /// means (the official Yuan code). Equal when every micro-batch counts as many labels.
  LossAverage loss_average = LossAverage::kToken;
};

/// One source of a weighted training mixture (data.blend; docs/data.md, "Blends").
struct BlendEntry {
  std::string prefix;        ///< Megatron indexed dataset (.bin/.idx) of this source's training data
  double weight = 0.0;       ///< > 0; normalised over the blend
  std::string valid_prefix;  ///< this source's validation split (a loss of its own); empty = none
  std::string name;          ///< label in logs and metrics; empty = the prefix's file name
  std::optional<LossMask> loss_mask;  ///< this source's mask; absent = data.loss_mask

  bool operator==(const BlendEntry& o) const {
    return prefix == o.prefix && weight == o.weight && valid_prefix == o.valid_prefix && name == o.name &&
           loss_mask == o.loss_mask;
  }
};

/// The label of a blend source: its name, else the file name of its prefix ("data/web_train" -> "web_train").
std::string blend_source_name(const BlendEntry& entry);

struct DataConfig {
  std::string train_prefix;
  std::string valid_prefix;
  std::string tokenizer;
  bool reset_position_ids = true;
  /// A token attends only to earlier tokens of its own document of a packed sample (attention and
  /// LFA); needs reset_position_ids (docs/data.md).
  bool reset_attention_mask = false;
  int64_t eod_id = -1;  ///< -1 = take it from the tokenizer
  /// kSft: labels of instruction tokens (before each sample's <sep>) are ignored by the LM loss.
  LossMask loss_mask = LossMask::kNone;
  int64_t sep_id = -1;  ///< the <sep> token id; -1 = from the dataset's .meta.json, else the tokenizer
  /// Weighted training mixture (Megatron's --data-path w1 p1 w2 p2 ...); absent = train_prefix alone.
  std::optional<std::vector<BlendEntry>> blend;
};

struct ParallelConfig {
  int64_t pipeline_parallel_size = 1;
  PipelineSchedule pipeline_schedule = PipelineSchedule::k1F1B;
  int64_t first_stage_layers = 0;  ///< layers of the first stage; 0 = balanced (Megatron's
  int64_t last_stage_layers = 0;   ///< --decoder-first/last-pipeline-num-layers)
  /// Expert parallelism: the experts of each MoE layer split over this many data-parallel ranks
  /// of a stage (Megatron's layout; docs/parallelism.md). 1 = every rank holds every expert.
  int64_t expert = 1;
  /// ZeRO-1 / Megatron's distributed optimizer: AdamW state sharded over the data-parallel group.
  bool shard_optimizer = false;
  /// Data-parallel gradient reduction started from gradient hooks during the step's last
  /// backward (PyTorch DDP, Megatron's --overlap-grad-reduce) rather than after it.
  bool overlap_grad_reduce = true;
  double grad_bucket_mb = 25.0;  ///< MiB of gradients per reduction bucket (PyTorch DDP's bucket_cap_mb)
  Backend backend = Backend::kAuto;
  int64_t timeout_s = 300;
};

struct CheckpointConfig {
  int64_t interval = 0;  ///< 0 = only at the end
  int64_t keep_last = 3;
  std::string dir = "checkpoints";
};

struct LogConfig {
  int64_t interval = 1;
  bool progress = true;
  bool plots = true;
  bool tensorboard = true;
  std::string tensorboard_dir;  ///< "" = RUN_DIR/tensorboard
  double peak_tflops = 0.0;  ///< 0 = measured at start-up
};

/// The whole run: exactly the sections of the JSON file.
struct RunConfig {
  ModelConfig model;
  MoeConfig moe;
  TrainConfig train;
  DataConfig data;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  LogConfig log;
};

/// The spelling of an enum value in JSON, and the table used to parse it.
template <class Enum>
const std::vector<std::pair<Enum, const char*>>& enum_names();
template <class Enum>
std::string to_string(Enum value);

}  // namespace yuanmoe::config
