// Range and cross-field rules of the run config. Each rule names the key it is about.
#include "yuanmoe/config/validate.h"

#include <map>
#include <sstream>

namespace yuanmoe::config {
namespace {

class Checker {
 public:
  explicit Checker(std::vector<ConfigIssue>* issues) : issues_(issues) {}

  void require(bool ok, const std::string& path, const std::string& message) {
    if (!ok) issues_->push_back({path, message});
  }
  template <class T>
  void positive(T value, const std::string& path) {
    require(value > 0, path, "must be > 0, got " + str(value));
  }
  template <class T>
  void non_negative(T value, const std::string& path) {
    require(value >= 0, path, "must be >= 0, got " + str(value));
  }
  template <class T>
  static std::string str(T value) {
    std::ostringstream out;
    out << value;
    return out.str();
  }

 private:
  std::vector<ConfigIssue>* issues_;
};

void validate_model(const ModelConfig& m, Checker& c) {
  c.positive(m.num_layers, "model.num_layers");
  c.positive(m.hidden_size, "model.hidden_size");
  c.positive(m.num_attention_heads, "model.num_attention_heads");
  c.positive(m.head_dim, "model.head_dim");
  c.non_negative(m.rotary_dim, "model.rotary_dim");
  c.require(m.rotary_dim % 2 == 0, "model.rotary_dim",
            "must be even (rotate-half pairs dim i with i + rotary_dim/2), got " +
                Checker::str(m.rotary_dim));
  c.require(m.rotary_dim <= m.head_dim, "model.rotary_dim",
            "must be <= model.head_dim (" + Checker::str(m.head_dim) + "), got " +
                Checker::str(m.rotary_dim));
  c.positive(m.rope_base, "model.rope_base");
  c.positive(m.vocab_size, "model.vocab_size");
  c.positive(m.max_seq_length, "model.max_seq_length");
  c.positive(m.rms_norm_eps, "model.rms_norm_eps");
  c.positive(m.init_std, "model.init_std");
  c.require(m.attention_dropout >= 0 && m.attention_dropout < 1, "model.attention_dropout",
            "must be in [0, 1), got " + Checker::str(m.attention_dropout));
  c.require(!m.lfa || m.hidden_size % 2 == 0, "model.hidden_size",
            "must be even with model.lfa (the first LFA conv has hidden_size/2 channels), got " +
                Checker::str(m.hidden_size));
}

void validate_moe(const MoeConfig& m, Checker& c) {
  c.positive(m.num_experts, "moe.num_experts");
  c.positive(m.top_k, "moe.top_k");
  c.require(m.top_k <= m.num_experts, "moe.top_k",
            "must be <= moe.num_experts (" + Checker::str(m.num_experts) + "), got " +
                Checker::str(m.top_k));
  c.require(m.router != RouterKind::kRelu || m.top_k < m.num_experts, "moe.top_k",
            "must be < moe.num_experts with the relu router (target sparsity 1 - top_k/E > 0)");
  c.positive(m.ffn_hidden_size, "moe.ffn_hidden_size");
  c.non_negative(m.aux_loss_coeff, "moe.aux_loss_coeff");
  c.non_negative(m.z_loss_coeff, "moe.z_loss_coeff");
  c.non_negative(m.bias_balancing_rate, "moe.bias_balancing_rate");
  c.positive(m.relu_l1_init, "moe.relu_l1_init");
  c.require(m.relu_l1_alpha > 1, "moe.relu_l1_alpha",
            "must be > 1, got " + Checker::str(m.relu_l1_alpha));
  c.non_negative(m.capacity_factor, "moe.capacity_factor");
  c.require(m.capacity_factor == 0 || is_top_k_router(m.router), "moe.capacity_factor",
            "must be 0 (dropless) with the " + to_string(m.router) +
                " router: it routes a variable number of experts per token");
  c.positive(m.moe_layer_freq, "moe.moe_layer_freq");
  c.non_negative(m.dense_ffn_hidden_size, "moe.dense_ffn_hidden_size");
}

void validate_train(const TrainConfig& t, const ModelConfig& model, Checker& c) {
  c.positive(t.seq_length, "train.seq_length");
  c.require(t.seq_length <= model.max_seq_length, "train.seq_length",
            "must be <= model.max_seq_length (" + Checker::str(model.max_seq_length) +
                "), got " + Checker::str(t.seq_length));
  c.positive(t.micro_batch_size, "train.micro_batch_size");
  c.positive(t.global_batch_size, "train.global_batch_size");
  c.require(t.micro_batch_size <= 0 || t.global_batch_size % t.micro_batch_size == 0,
            "train.global_batch_size",
            "must be divisible by train.micro_batch_size (" + Checker::str(t.micro_batch_size) +
                "), got " + Checker::str(t.global_batch_size));
  c.positive(t.max_steps, "train.max_steps");
  c.positive(t.lr, "train.lr");
  c.require(t.min_lr >= 0 && t.min_lr <= t.lr, "train.min_lr",
            "must be in [0, train.lr], got " + Checker::str(t.min_lr));
  c.non_negative(t.warmup_steps, "train.warmup_steps");
  c.non_negative(t.weight_decay, "train.weight_decay");
  c.require(t.adam_beta1 >= 0 && t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)");
  c.require(t.adam_beta2 >= 0 && t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)");
  c.positive(t.adam_eps, "train.adam_eps");
  c.non_negative(t.grad_clip, "train.grad_clip");
  c.positive(t.max_consecutive_skips, "train.max_consecutive_skips");
  c.non_negative(t.seed, "train.seed");
  c.non_negative(t.eval_interval, "train.eval_interval");
  c.positive(t.eval_steps, "train.eval_steps");
}

}  // namespace

std::vector<ConfigIssue> validate(const RunConfig& config) {
  std::vector<ConfigIssue> issues;
  Checker c(&issues);
  validate_model(config.model, c);
  validate_moe(config.moe, c);
  validate_train(config.train, config.model, c);

  c.require(!(config.train.precision == Precision::kFp64 && config.moe.expert_gemm == ExpertGemm::kGroupedMm),
            "moe.expert_gemm", "grouped_mm has no fp64 kernel: use loop or auto with train.precision = fp64");

  const auto& d = config.data;
  c.require(d.eod_id >= -1 && d.eod_id < config.model.vocab_size, "data.eod_id",
            "must be -1 (from the tokenizer) or a token id below model.vocab_size, got " +
                Checker::str(d.eod_id));
  c.require(d.sep_id >= -1 && d.sep_id < config.model.vocab_size && (d.sep_id < 0 || d.sep_id != d.eod_id),
            "data.sep_id",
            "must be -1 (from the dataset or tokenizer) or a token id below model.vocab_size other than "
            "data.eod_id, got " + Checker::str(d.sep_id));
  c.require(!d.reset_attention_mask || d.reset_position_ids, "data.reset_attention_mask",
            "needs data.reset_position_ids = true (a masked document's positions start at 0, as Megatron's)");

  if (d.blend) {
    // Megatron's rule (docs/data.md, "Blends"): positive weights, normalised; one set of training data.
    c.require(!d.blend->empty(), "data.blend", "is empty: list at least one {\"prefix\", \"weight\"} (or leave "
                                               "data.blend out and set data.train_prefix)");
    c.require(d.train_prefix.empty(), "data.blend",
              "and data.train_prefix are both set: data.blend names the training data (move data.train_prefix "
              "into the blend or remove it)");
    std::map<std::string, size_t> names;
    for (size_t i = 0; i < d.blend->size(); ++i) {
      const BlendEntry& e = (*d.blend)[i];
      const std::string at = "data.blend[" + std::to_string(i) + "]";
      c.require(!e.prefix.empty(), at, "prefix is empty");
      c.require(e.weight > 0, at, "weight must be > 0, got " + Checker::str(e.weight) + " (prefix \"" + e.prefix + "\")");
      const std::string name = blend_source_name(e);
      const auto [first, inserted] = names.emplace(name, i);
      c.require(inserted, at, "name \"" + name + "\" is also data.blend[" + std::to_string(first->second) +
                                  "]'s: give the entries distinct \"name\"s (the object form)");
    }
  }

  const auto& p = config.parallel;
  c.positive(p.pipeline_parallel_size, "parallel.pipeline_parallel_size");
  c.require(p.pipeline_parallel_size <= config.model.num_layers,
            "parallel.pipeline_parallel_size",
            "must be <= model.num_layers (" + Checker::str(config.model.num_layers) +
                "): every stage needs a layer");
  c.non_negative(p.first_stage_layers, "parallel.first_stage_layers");
  c.non_negative(p.last_stage_layers, "parallel.last_stage_layers");
  {
    // What the other stages keep: at least one layer each, and exactly the rest when the first
    // and last are the only ones.
    const int64_t fixed = p.first_stage_layers + p.last_stage_layers;
    const int64_t fixed_stages = (p.first_stage_layers > 0) + (p.last_stage_layers > 0);
    const int64_t others = p.pipeline_parallel_size - fixed_stages;
    const int64_t rest = config.model.num_layers - fixed;
    c.require(fixed == 0 || p.pipeline_parallel_size > 1, "parallel.first_stage_layers",
              "and parallel.last_stage_layers need parallel.pipeline_parallel_size > 1");
    c.require(fixed == 0 || p.pipeline_parallel_size <= 1 || (others == 0 ? rest == 0 : rest >= others),
              "parallel.last_stage_layers",
              "with parallel.first_stage_layers leaves " + Checker::str(rest) + " of model.num_layers (" +
                  Checker::str(config.model.num_layers) + ") for " + Checker::str(others) +
                  " other stage(s): each needs at least one, and none may be left over");
  }
  c.positive(p.timeout_s, "parallel.timeout_s");
  c.positive(p.grad_bucket_mb, "parallel.grad_bucket_mb");
  c.positive(p.expert, "parallel.expert");
  c.require(p.expert <= 1 || config.moe.num_experts % p.expert == 0, "parallel.expert",
            "is " + Checker::str(p.expert) + ", which does not divide moe.num_experts (" +
                Checker::str(config.moe.num_experts) + "): every rank holds the same number of experts");

  c.non_negative(config.checkpoint.interval, "checkpoint.interval");
  c.positive(config.checkpoint.keep_last, "checkpoint.keep_last");
  c.require(!config.checkpoint.dir.empty(), "checkpoint.dir", "must not be empty");
  c.positive(config.log.interval, "log.interval");
  c.non_negative(config.log.peak_tflops, "log.peak_tflops");
  return issues;
}

std::vector<ConfigIssue> validate_layout(const RunConfig& config, int64_t data_parallel_size) {
  std::vector<ConfigIssue> issues;
  Checker c(&issues);
  // Megatron's layout: expert-parallel groups are carved out of each stage's data-parallel ranks.
  const int64_t ep = config.parallel.expert;
  c.require(ep <= 1 || data_parallel_size % ep == 0, "parallel.expert",
            "is " + Checker::str(ep) + ", which does not divide the data-parallel size (" +
                Checker::str(data_parallel_size) + " = world size / parallel.pipeline_parallel_size)");
  return issues;
}

std::vector<ConfigIssue> validate_training(const RunConfig& config, int64_t data_parallel_size) {
  std::vector<ConfigIssue> issues;
  Checker c(&issues);
  const TrainConfig& t = config.train;
  c.require(!config.data.train_prefix.empty() || config.data.blend, "data.train_prefix",
            "required for training (or data.blend)");
  const bool divisible = t.global_batch_size % (t.micro_batch_size * data_parallel_size) == 0;
  c.require(divisible, "train.global_batch_size",
            "must be divisible by train.micro_batch_size x data-parallel size (" + Checker::str(t.micro_batch_size) +
                " x " + Checker::str(data_parallel_size) + "), got " + Checker::str(t.global_batch_size));
  for (auto& issue : validate_layout(config, data_parallel_size)) issues.push_back(std::move(issue));
  return issues;
}

std::vector<ConfigIssue> config_warnings(const RunConfig& config) {
  std::vector<ConfigIssue> warnings;
  const auto& m = config.moe;
  if (!is_top_k_router(m.router)) {
    const std::string why = "has no effect with the " + to_string(m.router) +
                            " router (balancing terms apply to top-k routers)";
    if (m.aux_loss_coeff > 0) warnings.push_back({"moe.aux_loss_coeff", why});
    if (m.z_loss_coeff > 0) warnings.push_back({"moe.z_loss_coeff", why});
    if (m.bias_balancing_rate > 0) warnings.push_back({"moe.bias_balancing_rate", why});
    if (m.balance_scope != BalanceScope::kMicroBatch) warnings.push_back({"moe.balance_scope", why});
  } else if (m.balance_scope != BalanceScope::kMicroBatch && m.aux_loss_coeff == 0 && m.bias_balancing_rate == 0) {
    warnings.push_back({"moe.balance_scope", "has no effect without moe.aux_loss_coeff or moe.bias_balancing_rate"});
  }
  if (m.router == RouterKind::kDense && m.top_k != m.num_experts) {
    warnings.push_back({"moe.top_k", "has no effect with the dense router: every expert runs"});
  }
  return warnings;
}

}  // namespace yuanmoe::config
