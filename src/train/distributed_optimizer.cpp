#include "yuanmoe/train/distributed_optimizer.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>

#include "yuanmoe/train/gradient_buckets.h"
#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {

namespace {

/// A parameter as the optimizer sees it.
struct Slot {
  std::string name;
  Tensor parameter;
  bool in_norm = true;  // false for the last stage's copy of a tied embedding
  bool expert = false;  // reduced over the edp group (expert parallelism)
};

/// The part of one parameter this rank updates: AdamW steps `values` with its gradient. Sharded,
/// `values` views the parameter's chunk and its gradient is the reduced chunk; over a shard
/// group of one it is the parameter itself.
struct Piece {
  size_t slot = 0;
  int64_t begin = 0;         // first element, in the flattened parameter
  size_t bucket = 0;         // in its group's GradientBuckets
  int64_t chunk_offset = 0;  // first element, in its bucket's chunk
  Tensor values;
};

/// The parameters that one group holds copies of: dense ones over dp, experts over edp.
struct ReduceGroup {
  const parallel::Group* copies = nullptr;  // the ranks holding them: the gradient is their mean
  const parallel::Group* shard = nullptr;   // the ranks sharing their AdamW work: copies, or one
  std::vector<size_t> slots;                // in registration order
  std::unique_ptr<GradientBuckets> buckets;
  std::vector<size_t> pieces;               // in registration order
  std::vector<std::vector<size_t>> pieces_of_bucket;
};

/// `value` ([] on the parameters' device: NCCL reduces device tensors only) summed over `group`.
Tensor sum_over(const parallel::Group& group, Tensor value) {
  group.all_reduce_sum(value);
  return value;
}

}  // namespace

struct DistributedOptimizer::Layout {
  std::vector<Slot> slots;
  ReduceGroup dense, expert;
  std::vector<Piece> pieces;
  std::vector<std::vector<size_t>> pieces_of_slot;
  Tensor tied_embedding;   // this stage's copy when the embedding group is real
  parallel::Group alone;   // the shard group when not sharding

  /// The group's pieces in registration order (the norm's order of summation).
  std::vector<Tensor> piece_values(const ReduceGroup& group, bool norm_only) const {
    std::vector<Tensor> out;
    for (size_t p : group.pieces) {
      if (!norm_only || slots[pieces[p].slot].in_norm) out.push_back(pieces[p].values);
    }
    return out;
  }
};

DistributedOptimizer::DistributedOptimizer(model::TransformerImpl& model, const config::TrainConfig& train,
                                           const parallel::ParallelContext& parallel, bool shard,
                                           parallel::ExpertSharding experts, bool overlap_reduction,
                                           int64_t bucket_bytes)
    : model_(model), parallel_(parallel), shard_(shard), experts_(std::move(experts)), layout_(std::make_unique<Layout>()) {
  Layout& layout = *layout_;
  layout.dense.copies = &parallel_.dp;
  layout.expert.copies = &parallel_.edp;
  for (ReduceGroup* group : {&layout.dense, &layout.expert}) group->shard = shard_ ? group->copies : &layout.alone;
  for (const auto& item : model_.named_parameters()) {
    Slot slot;
    slot.name = item.key();
    slot.parameter = item.value();
    slot.in_norm = !model_.stage.holds_tied_copy(slot.name);
    TORCH_CHECK(slot.parameter.is_contiguous(), slot.name, ": the optimizer needs contiguous parameters");
    slot.expert = experts_.ranks > 1 && experts_.names.count(slot.name) > 0;
    (slot.expert ? layout.expert : layout.dense).slots.push_back(layout.slots.size());
    layout.slots.push_back(std::move(slot));
  }
  if (parallel_.embedding.size() > 1) layout.tied_embedding = model_.embed_tokens->weight;
  layout.pieces_of_slot.resize(layout.slots.size());

  // Each group's buckets (train/gradient_buckets.h); rank r of a shard group of g owns elements
  // [r c, (r + 1) c) of each bucket (c = ceil(elements / g)), cut at parameter boundaries into
  // pieces.
  const int64_t dp = parallel_.layout().dp;
  std::vector<Piece> pieces;
  for (ReduceGroup* group : {&layout.dense, &layout.expert}) {
    std::vector<Tensor> parameters;
    std::vector<std::string> names;
    int64_t held = -1;  // the tied copy: summed over the embedding group before its bucket starts
    for (size_t i : group->slots) {
      if (layout.tied_embedding.defined() && layout.slots[i].parameter.is_same(layout.tied_embedding)) {
        held = static_cast<int64_t>(parameters.size());
      }
      parameters.push_back(layout.slots[i].parameter);
      names.push_back(layout.slots[i].name);
    }
    group->buckets = std::make_unique<GradientBuckets>(std::move(parameters), std::move(names), held, *group->copies,
                                                       *group->shard, dp, overlap_reduction, bucket_bytes);
    const int64_t size = group->shard->size(), rank = group->shard->rank();
    const std::vector<GradientBucket>& buckets = group->buckets->buckets();
    group->pieces_of_bucket.resize(buckets.size());
    for (size_t b = 0; b < buckets.size(); ++b) {
      const GradientBucket& bucket = buckets[b];
      const int64_t own_begin = rank * bucket.chunk, own_end = own_begin + bucket.chunk;
      for (size_t k = 0; k < bucket.parameters.size(); ++k) {
        const size_t slot_index = group->slots[bucket.parameters[k]];
        const Slot& slot = layout.slots[slot_index];
        const int64_t first = std::max(own_begin, bucket.offsets[k]);
        const int64_t end = std::min(own_end, bucket.offsets[k] + slot.parameter.numel());
        if (first >= end) continue;
        Piece piece;
        piece.slot = slot_index;
        piece.begin = first - bucket.offsets[k];
        piece.bucket = b;
        piece.chunk_offset = first - own_begin;
        piece.values = size == 1 ? slot.parameter : slot.parameter.detach().view(-1).narrow(0, piece.begin, end - first);
        pieces.push_back(std::move(piece));
      }
    }
  }
  // Pieces (AdamW's parameters) in registration order: a slot has at most one piece per rank.
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.slot < b.slot; });
  std::vector<Tensor> piece_values;
  std::vector<double> weight_decays;
  for (Piece& piece : pieces) {
    const size_t p = layout.pieces.size();
    ReduceGroup& group = layout.slots[piece.slot].expert ? layout.expert : layout.dense;
    group.pieces.push_back(p);
    group.pieces_of_bucket[piece.bucket].push_back(p);
    layout.pieces_of_slot[piece.slot].push_back(p);
    piece_values.push_back(piece.values);  // AdamW's parameter p is piece p
    weight_decays.push_back(uses_weight_decay(layout.slots[piece.slot].parameter) ? train.weight_decay : 0.0);
    layout.pieces.push_back(std::move(piece));
  }
  adamw_ = std::make_unique<AdamW>(std::move(piece_values), std::move(weight_decays), train);
}

DistributedOptimizer::~DistributedOptimizer() = default;

void DistributedOptimizer::set_learning_rate(double lr) { adamw_->set_learning_rate(lr); }

void DistributedOptimizer::reduce_during_next_backward() {
  for (ReduceGroup* group : {&layout_->dense, &layout_->expert}) group->buckets->arm();
}

void DistributedOptimizer::reduce_gradients() {
  torch::NoGradGuard no_grad;
  Layout& layout = *layout_;
  if (layout.tied_embedding.defined()) {  // Megatron: both copies step with the sum of their gradients
    Tensor& grad = layout.tied_embedding.mutable_grad();
    if (!grad.defined()) grad = torch::zeros_like(layout.tied_embedding);
    parallel_.embedding.all_reduce_sum(grad);
  }
  for (ReduceGroup* group : {&layout.dense, &layout.expert}) {
    GradientBuckets& buckets = *group->buckets;
    if (!buckets.active()) continue;  // one copy: its gradient is the mean
    // Each piece's gradient becomes a view of the bucket's mean: no copy back, and the buffer
    // lives as long as the gradients (until the next step's zero_grad).
    buckets.finish([&](size_t bucket, const Tensor& mean) {
      for (size_t p : group->pieces_of_bucket[bucket]) {
        Piece& piece = layout.pieces[p];
        piece.values.mutable_grad() = mean.narrow(0, piece.chunk_offset, piece.values.numel()).view_as(piece.values);
      }
    });
  }
}

std::vector<Tensor> DistributedOptimizer::gradients() const {
  std::vector<Tensor> out;
  for (const Piece& piece : layout_->pieces) {
    if (piece.values.grad().defined()) out.push_back(piece.values.grad());
  }
  return out;
}

DistributedOptimizer::ReductionSeconds DistributedOptimizer::reduction_seconds() const {
  ReductionSeconds out;
  for (const ReduceGroup* group : {&layout_->dense, &layout_->expert}) {
    out.after_backward += group->buckets->finish_seconds();
    out.waiting += group->buckets->wait_seconds();
  }
  return out;
}

Tensor DistributedOptimizer::squared_gradient_norm() const {
  const Layout& layout = *layout_;
  // [dense, expert] sums of squares; each is complete once summed over the ranks that hold
  // disjoint parts of it: shards over their group, experts over the ep group.
  const torch::Device device = layout.slots.front().parameter.device();
  const Tensor dense =
      sum_over(*layout.dense.shard, squared_gradient_sum(layout.piece_values(layout.dense, true), device));
  const Tensor expert =
      sum_over(*layout.expert.shard, squared_gradient_sum(layout.piece_values(layout.expert, true), device));
  return sum_over(parallel_.pp, dense + sum_over(parallel_.ep, expert));
}

void DistributedOptimizer::step(double max_norm, double norm) {
  const Layout& layout = *layout_;
  adamw_->step(clip_divisor(max_norm, norm));  // AdamW's parameters are the pieces
  torch::NoGradGuard no_grad;
  for (const ReduceGroup* group : {&layout.dense, &layout.expert}) {
    if (group->shard->size() == 1) continue;  // the pieces are the parameters
    const std::vector<GradientBucket>& buckets = group->buckets->buckets();
    for (size_t b = 0; b < buckets.size(); ++b) {
      const GradientBucket& bucket = buckets[b];
      const Tensor& first = layout.slots[group->slots[bucket.parameters.front()]].parameter;
      Tensor own = torch::zeros({bucket.chunk}, first.options());  // [chunk]
      for (size_t p : group->pieces_of_bucket[b]) {
        const Piece& piece = layout.pieces[p];
        own.narrow(0, piece.chunk_offset, piece.values.numel()).copy_(piece.values);
      }
      const Tensor gathered = group->shard->all_gather(own);  // [size x chunk]
      for (size_t k = 0; k < bucket.parameters.size(); ++k) {
        Tensor parameter = layout.slots[group->slots[bucket.parameters[k]]].parameter.detach();
        parameter.view(-1).copy_(gathered.narrow(0, bucket.offsets[k], parameter.numel()));
      }
    }
  }
}

checkpoint::NamedTensors DistributedOptimizer::state_by_name() const {
  const Layout& layout = *layout_;
  std::map<size_t, checkpoint::NamedTensors> by_slot;
  for (const ReduceGroup* group : {&layout.dense, &layout.expert}) {
    // The step count of each parameter, from the rank holding its first element (0: no state; a
    // parameter that never had a gradient, e.g. an expert no token reached yet, has none).
    if (group->slots.empty()) continue;
    // The counts stay on the device (AdamW keeps them there) until the one read below.
    const auto fp64 = torch::dtype(torch::kDouble).device(layout.slots.front().parameter.device());
    std::vector<Tensor> own_steps;
    for (size_t slot : group->slots) {
      Tensor own = torch::zeros({}, fp64);
      for (size_t p : layout.pieces_of_slot[slot]) {
        const AdamW::State* state = adamw_->state(p);
        if (layout.pieces[p].begin == 0 && state) own = state->step.to(torch::kDouble);
      }
      own_steps.push_back(own);
    }
    Tensor steps = torch::stack(own_steps);
    group->shard->all_reduce_sum(steps);
    steps = steps.to(torch::kCPU);
    for (size_t j = 0; j < group->slots.size(); ++j) {
      const int64_t step = static_cast<int64_t>(steps[static_cast<int64_t>(j)].item<double>());
      if (step == 0) continue;
      const Slot& slot = layout.slots[group->slots[j]];
      checkpoint::NamedTensors& entries = by_slot[group->slots[j]];
      for (const bool first_moment : {true, false}) {
        // Zeros outside this rank's pieces: the shard group's sum is the whole tensor, exactly.
        Tensor whole = torch::zeros({slot.parameter.numel()}, slot.parameter.options());
        for (size_t p : layout.pieces_of_slot[group->slots[j]]) {
          const Piece& piece = layout.pieces[p];
          if (const AdamW::State* state = adamw_->state(p)) {
            const Tensor& moment = first_moment ? state->exp_avg : state->exp_avg_sq;
            whole.narrow(0, piece.begin, piece.values.numel()).copy_(moment.reshape(-1));
          }
        }
        group->shard->all_reduce_sum(whole);
        entries.emplace_back(slot.name + (first_moment ? "/exp_avg" : "/exp_avg_sq"),
                             whole.view(slot.parameter.sizes()).to(torch::kCPU));
      }
      entries.emplace_back(slot.name + "/step", torch::tensor(step, torch::kLong));
    }
  }
  checkpoint::NamedTensors out;
  for (auto& [slot, entries] : by_slot) {
    for (auto& entry : entries) out.push_back(std::move(entry));
  }
  return experts_.to_global(out, parallel_.ep);
}

void DistributedOptimizer::load_state_by_name(const checkpoint::NamedTensors& global, const std::string& source) {
  const Layout& layout = *layout_;
  const checkpoint::NamedTensors local = experts_.to_local(global);
  std::map<std::string, Tensor> by_name(local.begin(), local.end());
  const auto take = [&](const std::string& name) {
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error(source + ": optimizer state lacks '" + name + "'");
    Tensor t = it->second;
    by_name.erase(it);
    return t;
  };
  adamw_->clear_state();
  for (size_t i = 0; i < layout.slots.size(); ++i) {
    const Slot& slot = layout.slots[i];
    if (by_name.count(slot.name + "/step") == 0) continue;  // no state yet
    const int64_t step = take(slot.name + "/step").item<int64_t>();
    const Tensor exp_avg = take(slot.name + "/exp_avg"), exp_avg_sq = take(slot.name + "/exp_avg_sq");
    for (const Tensor& t : {exp_avg, exp_avg_sq}) {
      if (t.sizes() != slot.parameter.sizes()) {
        throw std::runtime_error(source + ": optimizer state of '" + slot.name + "' has shape " + c10::str(t.sizes()) +
                                 ", the parameter " + c10::str(slot.parameter.sizes()));
      }
    }
    for (size_t p : layout.pieces_of_slot[i]) {
      const Piece& piece = layout.pieces[p];
      const auto own = [&](const Tensor& t) { return t.reshape(-1).narrow(0, piece.begin, piece.values.numel()); };
      adamw_->set_state(p, step, own(exp_avg), own(exp_avg_sq));
    }
  }
  if (!by_name.empty()) {
    throw std::runtime_error(source + ": optimizer state for unknown parameter '" + by_name.begin()->first + "'");
  }
}

int64_t DistributedOptimizer::state_bytes() const { return adamw_->state_bytes(); }

}  // namespace yuanmoe::train
