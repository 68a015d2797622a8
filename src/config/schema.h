// The config schema: every JSON key, its struct field, whether it is required, its meaning, and
// its role when a checkpoint is loaded (KeyRole).
// A visitor walks it to parse (config_io.cpp), to serialise, and to document keys, so adding a
// key here is the whole change. Private to src/config.
#pragma once

#include <string>

#include "yuanmoe/config/config.h"
#include "yuanmoe/config/config_io.h"

namespace yuanmoe::config::schema {

enum Presence { kOptional, kRequired };

// A key's role when a checkpoint's config meets the config that loads it (KeyRole, config_io.h):
// model and moe keys are architecture unless marked; every other section's keys are knobs.
constexpr KeyRole kArchitecture = KeyRole::kArchitecture;
constexpr KeyRole kContext = KeyRole::kContext;
constexpr KeyRole kKnob = KeyRole::kKnob;

/// Keys that configs and checkpoints of earlier versions may still carry and that no longer mean
/// anything: read and ignored, so those files keep loading (docs/config.md, "Retired keys").
inline bool is_retired_key(const std::string& path) {
  return path == "model.attention_block_size"  // the blockwise attention kernel, replaced by SDPA
         || path == "moe.router_dtype"         // had one value (fp32) and no reader: routers are fp32
         || path == "parallel.num_microbatches";  // derived from the batch sizes, never read
}

template <class V>
void visit(V& v, ModelConfig& c) {
  v.field("num_layers", c.num_layers, kRequired, "Number of decoder layers L.");
  v.field("hidden_size", c.hidden_size, kRequired, "Residual stream width D.");
  v.field("num_attention_heads", c.num_attention_heads, kRequired,
          "Attention heads for Q, K and V (no grouped-query attention).");
  v.field("head_dim", c.head_dim, kRequired,
          "Per-head width Dh; attention width P = heads * Dh (Yuan: Dh = 2 * D / heads).");
  v.field("rotary_dim", c.rotary_dim, kRequired,
          "Leading dims of each head rotated by RoPE (even, <= head_dim; Yuan: head_dim / 2).");
  v.field("rope_base", c.rope_base, kOptional,
          "RoPE base theta; 40890 for the 16K fine-tune (NTK-aware rule from 10000).", kContext);
  v.field("rope_tables", c.rope_tables, kOptional,
          "exact (fp32 from integer positions), hf_bf16 (HF code: bf16 inv_freq, positions, angles, "
          "cos/sin) or megatron_bf16 (bf16-rounded inv_freq); the last two only for parity checks.", kContext);
  v.field("vocab_size", c.vocab_size, kRequired, "Vocabulary size V (embedding rows).");
  v.field("max_seq_length", c.max_seq_length, kRequired,
          "Longest sequence the model serves (train.seq_length must not exceed it).", kContext);
  v.field("rms_norm_eps", c.rms_norm_eps, kOptional, "Epsilon of every RMSNorm.");
  v.field("tie_embeddings", c.tie_embeddings, kOptional,
          "Output head reuses embed_tokens.weight (Yuan: true).");
  v.field("lfa", c.lfa, kOptional,
          "true: Localized Filtering-based Attention feeds Q/K; false: plain attention.");
  v.field("init_std", c.init_std, kOptional,
          "Std of the normal init; output projections use init_std / sqrt(2 L).", kKnob);
  v.field("attention_dropout", c.attention_dropout, kOptional,
          "Dropout on attention probabilities while training (Yuan: 0.1).", kKnob);
  v.field("attention", c.attention, kOptional,
          "Causal attention kernel: sdpa (libtorch's fused scaled_dot_product_attention: flash "
          "attention on CPU, flash / memory-efficient / cuDNN on CUDA; memory linear in the "
          "sequence) or materialised (the S x S scores, for checks). Training with "
          "attention_dropout > 0 and decoding after cached tokens always materialise.", kKnob);
}

template <class V>
void visit(V& v, MoeConfig& c) {
  v.field("num_experts", c.num_experts, kRequired, "Experts per MoE layer E.");
  v.field("top_k", c.top_k, kRequired,
          "Experts per token for top-k routers; the ReLU router's sparsity target is 1 - top_k/E.");
  v.field("ffn_hidden_size", c.ffn_hidden_size, kRequired, "SwiGLU width F of one expert.");
  v.field("router", c.router, kOptional,
          "attention (Yuan), linear (top-k softmax), relu (ReMoE), dense (Jacobs 1991 softmax).");
  v.field("aux_loss_coeff", c.aux_loss_coeff, kOptional,
          "Switch load-balancing loss coefficient (top-k routers; 1e-2 is usual).", kKnob);
  v.field("z_loss_coeff", c.z_loss_coeff, kOptional,
          "ST-MoE router z-loss coefficient (top-k routers; 1e-3 is usual).", kKnob);
  v.field("bias_balancing_rate", c.bias_balancing_rate, kOptional,
          "DeepSeek-V3 aux-loss-free expert-bias update rate per step (top-k routers); 0 = off.", kKnob);
  v.field("balance_scope", c.balance_scope, kOptional,
          "Tokens the aux loss and the bias update balance over (top-k routers; docs/routers.md): "
          "micro_batch (each micro-batch), sequence (each sequence, DeepSeek-V3), global_batch "
          "(expert counts summed over data-parallel ranks and the step's micro-batches, Qwen).", kKnob);
  v.field("relu_l1_init", c.relu_l1_init, kOptional, "ReMoE initial L1 coefficient lambda_0.", kKnob);
  v.field("relu_l1_alpha", c.relu_l1_alpha, kOptional,
          "ReMoE lambda multiplier per optimizer step (> 1).", kKnob);
  v.field("capacity_factor", c.capacity_factor, kOptional,
          "Expert capacity ceil(cf * T * k / E) with token dropping; 0 = dropless.", kKnob);
  v.field("moe_layer_freq", c.moe_layer_freq, kOptional,
          "Layer l is MoE when l % moe_layer_freq == 0, dense SwiGLU otherwise.");
  v.field("expert_gemm", c.expert_gemm, kOptional,
          "Expert GEMMs: loop (one GEMM pair per expert, host row counts), grouped_mm "
          "(at::_grouped_mm with device offsets: no host sync in dropless top-k layers; fp32 / bf16, "
          "dims multiples of 16 bytes), auto (grouped_mm on CUDA in bf16, loop otherwise).", kKnob);
  v.field("dense_ffn_hidden_size", c.dense_ffn_hidden_size, kOptional,
          "SwiGLU width of the dense layers; 0 = top_k * ffn_hidden_size (same active FLOPs).");
}

template <class V>
void visit(V& v, TrainConfig& c) {
  v.field("seq_length", c.seq_length, kRequired, "Tokens per training sequence.");
  v.field("micro_batch_size", c.micro_batch_size, kOptional, "Sequences per forward/backward.");
  v.field("global_batch_size", c.global_batch_size, kOptional,
          "Sequences per optimizer step over all data-parallel ranks.");
  v.field("max_steps", c.max_steps, kRequired, "Optimizer steps to train.");
  v.field("lr", c.lr, kOptional, "Peak learning rate.");
  v.field("min_lr", c.min_lr, kOptional, "Learning rate at the end of the decay.");
  v.field("warmup_steps", c.warmup_steps, kOptional, "Linear warm-up steps from 0 to lr.");
  v.field("lr_schedule", c.lr_schedule, kOptional, "Decay after warm-up.");
  v.field("weight_decay", c.weight_decay, kOptional, "AdamW decoupled weight decay (matrices).");
  v.field("adam_beta1", c.adam_beta1, kOptional, "AdamW beta1.");
  v.field("adam_beta2", c.adam_beta2, kOptional, "AdamW beta2.");
  v.field("adam_eps", c.adam_eps, kOptional, "AdamW epsilon.");
  v.field("grad_clip", c.grad_clip, kOptional, "Global gradient-norm clip; 0 = off.");
  v.field("seed", c.seed, kOptional, "Seed of init, data order and dropout.");
  v.field("precision", c.precision, kOptional, "Compute precision: fp32; bf16 (autocast over fp32 weights); fp64 (weights and math "
          "in double: slow, for equivalence checks).");
  v.field("recompute", c.recompute, kOptional, "Activation checkpointing of whole blocks.");
  v.field("init_from", c.init_from, kOptional,
          "Checkpoint dir whose weights start a fine-tune (fresh optimizer); empty = none.");
  v.field("on_nonfinite", c.on_nonfinite, kOptional,
          "A step with a non-finite loss or gradient norm: stop (nothing of it applied) or skip it "
          "(batch consumed, no update), at most max_consecutive_skips in a row.");
  v.field("max_consecutive_skips", c.max_consecutive_skips, kOptional,
          "With on_nonfinite = skip: this many non-finite steps in a row stop the run.");
  v.field("eval_interval", c.eval_interval, kOptional, "Steps between evaluations; 0 = at end.");
  v.field("eval_steps", c.eval_steps, kOptional, "Validation batches per evaluation.");
  v.field("loss_average", c.loss_average, kOptional,
          "token: the global batch's summed loss over its counted labels / their count (Megatron-Core's "
          "--calculate-per-token-loss); micro_batch: the mean of the micro-batches' means (the official Yuan "
          "code). Equal on data without a loss mask.");
}

template <class V>
void visit(V& v, DataConfig& c) {
  v.field("train_prefix", c.train_prefix, kOptional, "Megatron indexed dataset (.bin/.idx).");
  v.field("valid_prefix", c.valid_prefix, kOptional, "Validation dataset prefix.");
  v.field("tokenizer", c.tokenizer, kOptional, "SentencePiece .model file.");
  v.field("reset_position_ids", c.reset_position_ids, kOptional,
          "Restart positions at 0 after every end-of-document token in a packed sample.");
  v.field("reset_attention_mask", c.reset_attention_mask, kOptional,
          "A token attends only to earlier tokens of its own document in a packed sample (attention "
          "and LFA; Megatron's --reset-attention-mask); needs reset_position_ids.");
  v.field("eod_id", c.eod_id, kOptional, "End-of-document token id; -1 = from the tokenizer.");
  v.field("loss_mask", c.loss_mask, kOptional,
          "none, or sft: the LM loss ignores the labels of each sample's instruction (its tokens before "
          "<sep>; the <sep> and EOD labels count), also in documents cut by the window (docs/data.md).");
  v.field("sep_id", c.sep_id, kOptional,
          "The <sep> token id for loss_mask = sft; -1 = from the dataset's .meta.json, else the tokenizer.");
  v.field("blend", c.blend, kOptional,
          "Weighted training mixture instead of train_prefix: [{\"prefix\", \"weight\", \"valid_prefix\", "
          "\"name\", \"loss_mask\"}, ...] or Megatron's flat [w1, p1, w2, p2, ...]; null = train_prefix alone (docs/data.md).");
}

template <class V>
void visit(V& v, ParallelConfig& c) {
  v.field("pipeline_parallel_size", c.pipeline_parallel_size, kOptional, "Pipeline stages.");
  v.field("pipeline_schedule", c.pipeline_schedule, kOptional, "Pipeline schedule.");
  v.field("first_stage_layers", c.first_stage_layers, kOptional,
          "Layers on the first stage (which also holds the embedding); 0 = balanced.");
  v.field("last_stage_layers", c.last_stage_layers, kOptional,
          "Layers on the last stage (which also holds the head); 0 = balanced.");
  v.field("expert", c.expert, kOptional,
          "Expert-parallel size: each MoE layer's experts split over this many data-parallel ranks.");
  v.field("shard_optimizer", c.shard_optimizer, kOptional,
          "Shard AdamW state over the data-parallel group (ZeRO-1, Megatron's distributed optimizer).");
  v.field("overlap_grad_reduce", c.overlap_grad_reduce, kOptional,
          "Reduce each gradient bucket as soon as the backward completes it, hidden behind the rest of the "
          "backward (PyTorch DDP, Megatron's --overlap-grad-reduce); false = after the backward.");
  v.field("grad_bucket_mb", c.grad_bucket_mb, kOptional,
          "MiB of gradients per reduction bucket (PyTorch DDP's bucket_cap_mb): smaller buckets start sooner, "
          "larger ones cost fewer collectives.");
  v.field("backend", c.backend, kOptional, "c10d backend: auto = NCCL on CUDA, Gloo on CPU.");
  v.field("timeout_s", c.timeout_s, kOptional, "Collective and rendezvous timeout in seconds.");
}

template <class V>
void visit(V& v, CheckpointConfig& c) {
  v.field("interval", c.interval, kOptional, "Steps between checkpoints; 0 = only at the end.");
  v.field("keep_last", c.keep_last, kOptional, "Complete checkpoints kept; older are pruned.");
  v.field("dir", c.dir, kOptional, "Checkpoint dir, relative to the run dir.");
}

template <class V>
void visit(V& v, LogConfig& c) {
  v.field("interval", c.interval, kOptional, "Steps between metric lines.");
  v.field("progress", c.progress, kOptional, "Progress bar when stderr is a terminal (plain log lines otherwise).");
  v.field("plots", c.plots, kOptional, "Regenerate PNG plots under plots/ (needs gnuplot).");
  v.field("tensorboard", c.tensorboard, kOptional,
          "Write TensorBoard event files (rank 0): metrics.jsonl's numbers as train/, valid/ and moe/ tags.");
  v.field("tensorboard_dir", c.tensorboard_dir, kOptional,
          "Directory of the event files; empty = RUN_DIR/tensorboard (relative paths: to the run dir).");
  v.field("peak_tflops", c.peak_tflops, kOptional,
          "Device peak for MFU, TFLOP/s; 0 = measure with a large matmul at start-up.");
}

/// Sections in file order; every section is optional except model, moe and train. The role is
/// that of the section's keys unless a key names its own.
template <class V>
void visit(V& v, RunConfig& c) {
  v.section("model", c.model, kRequired, kArchitecture);
  v.section("moe", c.moe, kRequired, kArchitecture);
  v.section("train", c.train, kRequired, kKnob);
  v.section("data", c.data, kOptional, kKnob);
  v.section("parallel", c.parallel, kOptional, kKnob);
  v.section("checkpoint", c.checkpoint, kOptional, kKnob);
  v.section("log", c.log, kOptional, kKnob);
}

}  // namespace yuanmoe::config::schema
