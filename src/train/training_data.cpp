#include "yuanmoe/train/training_data.h"

#include <fmt/format.h>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/data/prepare.h"
#include "yuanmoe/train/evaluate.h"

namespace yuanmoe::train {

TrainingData::TrainingData(const config::RunConfig& config, const parallel::ParallelLayout& layout,
                           const std::function<void(const std::string&)>& info) {
  if (config.data.blend) {
    open_blend(config, layout, info);
  } else {
    open_prefix(config, layout);
  }
}

void TrainingData::open_prefix(const config::RunConfig& config, const parallel::ParallelLayout& layout) {
  const std::string& prefix = config.data.train_prefix;
  auto train_dataset = std::make_shared<const data::IndexedDataset>(prefix);
  if (auto meta = data::load_dataset_meta(prefix); meta && meta->vocab_size > config.model.vocab_size) {
    throw config::ConfigError("config", {{"model.vocab_size", "is " + std::to_string(config.model.vocab_size) +
                                                                  ", smaller than the vocabulary of " + prefix + " (" +
                                                                  std::to_string(meta->vocab_size) + ")"}});
  }
  data::SamplerOptions train_options = sampler_options(config, prefix);
  train_options.rank = layout.dp_rank;  // the sampler state is global: any dp degree resumes it
  train_options.world_size = layout.dp;
  if ((train_options.reset_position_ids || train_options.reset_attention_mask) && train_options.eod_id < 0) {
    throw config::ConfigError("config", {{"data.eod_id", "unknown: set it or data.tokenizer, or prepare the data "
                                                         "with yuanmoe prepare-data (its .meta.json names it), or "
                                                         "set data.reset_position_ids (and data.reset_attention_mask) "
                                                         "to false"}});
  }
  sampler_ = std::make_unique<data::GptSampler>(train_dataset, train_options);
  if (!config.data.valid_prefix.empty()) {
    // The train split's EOD: both come from one tokenizer.
    validation_.push_back(
        ValidationSplit{"", 1.0, std::make_shared<const data::IndexedDataset>(config.data.valid_prefix), train_options});
  }
}

void TrainingData::open_blend(const config::RunConfig& config, const parallel::ParallelLayout& layout,
                              const std::function<void(const std::string&)>& info) {
  // Every problem with an entry is one line naming it: data.blend[i]: ...
  const std::vector<config::BlendEntry>& blend = *config.data.blend;
  std::vector<std::shared_ptr<const data::IndexedDataset>> datasets;
  std::vector<double> weights;
  std::vector<data::SamplerOptions> options;
  std::optional<data::DatasetMeta> first_meta;  // of the first entry that has a .meta.json
  size_t first_meta_entry = 0;
  for (size_t i = 0; i < blend.size(); ++i) {
    const config::BlendEntry& entry = blend[i];
    const std::string at = "data.blend[" + std::to_string(i) + "]";
    const auto bad = [&](const std::string& message, const std::string& key = "") {
      return config::ConfigError("config", {{at + key, message}});
    };
    std::shared_ptr<const data::IndexedDataset> dataset;
    std::optional<data::DatasetMeta> meta;
    try {
      dataset = std::make_shared<const data::IndexedDataset>(entry.prefix);
      meta = data::load_dataset_meta(entry.prefix);
    } catch (const std::exception& e) {
      throw bad(std::string("prefix: ") + e.what());
    }
    if (dataset->num_tokens() < config.train.seq_length + 1) {
      throw bad(entry.prefix + " has " + std::to_string(dataset->num_tokens()) +
                " tokens, fewer than train.seq_length + 1 = " + std::to_string(config.train.seq_length + 1));
    }
    if (meta && meta->vocab_size > config.model.vocab_size) {
      throw bad("the vocabulary of " + entry.prefix + " (" + std::to_string(meta->vocab_size) +
                ", its .meta.json) is larger than model.vocab_size (" + std::to_string(config.model.vocab_size) + ")");
    }
    if (meta && first_meta && meta->vocab_size != first_meta->vocab_size) {
      throw bad(entry.prefix + " was tokenized with a vocabulary of " + std::to_string(meta->vocab_size) +
                ", data.blend[" + std::to_string(first_meta_entry) + "] with " + std::to_string(first_meta->vocab_size) +
                ": every source of a blend must come from one tokenizer");
    }
    data::SamplerOptions o = sampler_options(config, entry.prefix, entry.loss_mask);
    if (meta && config.data.eod_id >= 0 && meta->eod_id >= 0 && meta->eod_id != config.data.eod_id) {
      throw bad("the EOD id of " + entry.prefix + " is " + std::to_string(meta->eod_id) +
                " (its .meta.json), but data.eod_id is " + std::to_string(config.data.eod_id));
    }
    if (o.reset_position_ids && o.eod_id < 0) {
      throw bad("the EOD id of " + entry.prefix + " is unknown: set data.eod_id or data.tokenizer, or prepare the "
                "data with yuanmoe prepare-data (its .meta.json names it), or set data.reset_position_ids to false");
    }
    if (!options.empty() && o.eod_id != options.front().eod_id) {
      throw bad("the EOD id of " + entry.prefix + " is " + std::to_string(o.eod_id) + ", data.blend[0]'s is " +
                std::to_string(options.front().eod_id) + ": every source of a blend must come from one tokenizer");
    }
    if (!first_meta && meta) {
      first_meta = meta;
      first_meta_entry = i;
    }
    if (!entry.valid_prefix.empty()) {
      std::shared_ptr<const data::IndexedDataset> valid;
      try {
        valid = std::make_shared<const data::IndexedDataset>(entry.valid_prefix);
      } catch (const std::exception& e) {
        throw bad(e.what(), ".valid_prefix");
      }
      data::SamplerOptions valid_options = o;
      valid_options.rank = layout.dp_rank;
      valid_options.world_size = layout.dp;
      validation_.push_back(ValidationSplit{config::blend_source_name(entry), entry.weight, valid, valid_options});
    }
    datasets.push_back(dataset);
    weights.push_back(entry.weight);
    options.push_back(o);
  }
  data::SamplerOptions common = options.front();
  common.rank = layout.dp_rank;  // the blend state is global too: any dp degree resumes it
  common.world_size = layout.dp;
  try {
    blend_ = std::make_unique<data::BlendedSampler>(datasets, weights, options, common);
  } catch (const std::invalid_argument& e) {  // weights whose sum overflows
    throw config::ConfigError("config", {{"data.blend", e.what()}});
  }
  std::string mixture;
  for (size_t i = 0; i < blend.size(); ++i) {
    mixture += fmt::format("{}{} {:.4f}", i ? ", " : "", config::blend_source_name(blend[i]),
                           blend_->weights()[i]);
  }
  info("data: blend of " + std::to_string(blend.size()) + " sources (normalised weights): " + mixture);
  if (!config.data.valid_prefix.empty()) {
    // data.loss_mask, not the first source's: the split is the run's own.
    data::SamplerOptions valid_options = common;
    const data::SamplerOptions masked = sampler_options(config, config.data.valid_prefix);
    valid_options.sft_loss_mask = masked.sft_loss_mask;
    valid_options.sep_id = masked.sep_id;
    validation_.insert(validation_.begin(), ValidationSplit{"", 1.0, std::make_shared<const data::IndexedDataset>(
                                                                        config.data.valid_prefix),
                                                                    valid_options});
  }
}

data::Batch TrainingData::next_batch() { return blend_ ? blend_->next_batch() : sampler_->next_batch(); }

void TrainingData::save(checkpoint::TrainingProgress& progress) const {
  if (blend_) {
    progress.blend = blend_->state();
  } else {
    progress.sampler = sampler_->state();
  }
}

void TrainingData::restore(const checkpoint::TrainingProgress& progress, const std::filesystem::path& checkpoint_dir) {
  const std::string dir = checkpoint_dir.string();
  if (!blend_) {
    if (progress.blend) {
      throw config::ConfigError("config", {{"data.train_prefix", "is set, but " + dir + " was written by a run on "
                                                                 "data.blend: set the same data.blend to continue it"}});
    }
    sampler_->set_state(progress.sampler);
    return;
  }
  if (!progress.blend) {
    throw config::ConfigError("config", {{"data.blend", "is set, but " + dir + " was written by a run on "
                                                        "data.train_prefix: a blend cannot continue its sampler (use "
                                                        "a new run dir, or train.init_from)"}});
  }
  try {
    blend_->set_state(*progress.blend);
  } catch (const std::invalid_argument& e) {
    throw config::ConfigError("config", {{"data.blend", "does not fit the sampler state of " + dir + ": " + e.what()}});
  }
}

}  // namespace yuanmoe::train
