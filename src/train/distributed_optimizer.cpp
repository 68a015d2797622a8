#include "yuanmoe/train/distributed_optimizer.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>

#include "yuanmoe/train/gradient_sync.h"
#include "yuanmoe/train/optimizer.h"

namespace yuanmoe::train {

namespace {

constexpr int64_t kBucketElements = (25 << 20) / 4;  // about 25 MB of fp32 gradients per bucket

/// A parameter as the optimizer sees it.
struct Slot {
  std::string name;
  Tensor parameter;
  bool expert = false;   // under expert parallelism: reduced over edp, its norm summed over ep
  bool in_norm = true;   // false for the last stage's copy of a tied embedding
};

/// This rank's chunk of one parameter (sharded): AdamW updates `values`, a view of the
/// parameter, with the reduced gradient chunk as its gradient.
struct Piece {
  size_t slot = 0;
  int64_t begin = 0;        // first element, in the flattened parameter
  int64_t chunk_offset = 0;  // first element, in its bucket's chunk
  Tensor values;            // [len]
};

/// Parameters reduced together: consecutive slots of one group, about kBucketElements.
struct Bucket {
  std::vector<size_t> slots;
  std::vector<int64_t> offsets;  // each slot's first element in the bucket
  int64_t elements = 0;
  int64_t chunk = 0;             // ceil(elements / group size): the bucket is padded to size x chunk
  Tensor reduced_chunk;          // [chunk]: this rank's chunk of the reduced gradient
  std::vector<size_t> pieces;
};

/// The parameters that one group holds copies of: dense ones over dp, experts over edp.
struct ReduceGroup {
  const parallel::Group* group = nullptr;
  std::vector<size_t> slots;
  std::vector<Bucket> buckets;  // sharded only
};

/// `value` ([] on the parameters' device: NCCL reduces device tensors only) summed over `group`.
Tensor sum_over(const parallel::Group& group, Tensor value) {
  group.all_reduce_sum(value);
  return value;
}

std::vector<Tensor> gradients_holders(const std::vector<Slot>& slots, const std::vector<size_t>& ids, bool norm_only) {
  std::vector<Tensor> out;
  for (size_t i : ids) {
    if (!norm_only || slots[i].in_norm) out.push_back(slots[i].parameter);
  }
  return out;
}

}  // namespace

struct DistributedOptimizer::Layout {
  std::vector<Slot> slots;
  ReduceGroup dense, expert;
  std::vector<Piece> pieces;
  std::vector<std::vector<size_t>> pieces_of_slot;
  Tensor tied_embedding;  // this stage's copy when the embedding group is real

  std::vector<Tensor> all_parameters() const {
    std::vector<Tensor> out;
    for (const Slot& s : slots) out.push_back(s.parameter);
    return out;
  }
  std::vector<Tensor> piece_values(const ReduceGroup& group, bool norm_only) const {
    std::vector<Tensor> out;
    for (const Bucket& b : group.buckets) {
      for (size_t p : b.pieces) {
        if (!norm_only || slots[pieces[p].slot].in_norm) out.push_back(pieces[p].values);
      }
    }
    return out;
  }
};

DistributedOptimizer::DistributedOptimizer(model::TransformerImpl& model, const config::TrainConfig& train,
                                           const parallel::ParallelContext& parallel, bool shard,
                                           parallel::ExpertSharding experts)
    : model_(model), parallel_(parallel), shard_(shard), experts_(std::move(experts)), layout_(std::make_unique<Layout>()) {
  Layout& layout = *layout_;
  layout.dense.group = &parallel_.dp;
  layout.expert.group = &parallel_.edp;
  for (const auto& item : model_.named_parameters()) {
    Slot slot;
    slot.name = item.key();
    slot.parameter = item.value();
    slot.expert = experts_.ranks > 1 && experts_.names.count(slot.name) > 0;
    slot.in_norm = model_.stage.has_embedding || slot.name.rfind("embed_tokens.", 0) != 0;
    (slot.expert ? layout.expert : layout.dense).slots.push_back(layout.slots.size());
    layout.slots.push_back(std::move(slot));
  }
  if (parallel_.embedding.size() > 1) layout.tied_embedding = model_.embed_tokens->weight;
  layout.pieces_of_slot.resize(layout.slots.size());
  if (!shard_) {
    adamw_ = make_optimizer(model_, train);
    return;
  }

  // Buckets of consecutive parameters; rank r of a group of g owns elements [r c, (r + 1) c) of
  // each bucket (c = ceil(elements / g)), cut at parameter boundaries into pieces.
  std::vector<Tensor> decayed, not_decayed;
  for (ReduceGroup* group : {&layout.dense, &layout.expert}) {
    const int64_t size = group->group->size(), rank = group->group->rank();
    for (size_t i : group->slots) {
      if (group->buckets.empty() || group->buckets.back().elements >= kBucketElements) group->buckets.emplace_back();
      Bucket& bucket = group->buckets.back();
      bucket.slots.push_back(i);
      bucket.offsets.push_back(bucket.elements);
      bucket.elements += layout.slots[i].parameter.numel();
    }
    for (Bucket& bucket : group->buckets) {
      bucket.chunk = (bucket.elements + size - 1) / size;
      const int64_t own_begin = rank * bucket.chunk, own_end = own_begin + bucket.chunk;
      for (size_t k = 0; k < bucket.slots.size(); ++k) {
        const Slot& slot = layout.slots[bucket.slots[k]];
        TORCH_CHECK(slot.parameter.is_contiguous(), slot.name, ": the sharded optimizer needs contiguous parameters");
        const int64_t first = std::max(own_begin, bucket.offsets[k]);
        const int64_t end = std::min(own_end, bucket.offsets[k] + slot.parameter.numel());
        if (first >= end) continue;
        Piece piece;
        piece.slot = bucket.slots[k];
        piece.begin = first - bucket.offsets[k];
        piece.chunk_offset = first - own_begin;
        piece.values = slot.parameter.detach().view(-1).narrow(0, piece.begin, end - first);
        (uses_weight_decay(slot.parameter) ? decayed : not_decayed).push_back(piece.values);
        layout.pieces_of_slot[piece.slot].push_back(layout.pieces.size());
        bucket.pieces.push_back(layout.pieces.size());
        layout.pieces.push_back(std::move(piece));
      }
    }
  }
  adamw_ = make_adamw(std::move(decayed), std::move(not_decayed), train);
}

DistributedOptimizer::~DistributedOptimizer() = default;

void DistributedOptimizer::set_learning_rate(double lr) { train::set_learning_rate(*adamw_, lr); }

void DistributedOptimizer::reduce_gradients() {
  Layout& layout = *layout_;
  const int64_t dp = parallel_.layout().dp;
  if (!shard_ && experts_.ranks == 1) {
    synchronize_gradients(layout.all_parameters(), layout.tied_embedding, parallel_);
    return;
  }
  sum_tied_embedding_gradient(layout.tied_embedding, parallel_);
  if (!shard_) {
    all_reduce_mean(gradients_holders(layout.slots, layout.dense.slots, false), parallel_.dp, dp);
    all_reduce_mean(gradients_holders(layout.slots, layout.expert.slots, false), parallel_.edp, dp);
    return;
  }
  torch::NoGradGuard no_grad;
  for (ReduceGroup* group : {&layout.dense, &layout.expert}) {
    const int64_t size = group->group->size();
    for (Bucket& bucket : group->buckets) {
      std::vector<Tensor> parts;  // the bucket's gradients, flat in the parameters' dtype, then the padding
      for (size_t i : bucket.slots) {
        const Tensor& p = layout.slots[i].parameter;
        parts.push_back(p.grad().defined() ? p.grad().reshape(-1).to(p.scalar_type()) : torch::zeros({p.numel()}, p.options()));
      }
      const int64_t padding = size * bucket.chunk - bucket.elements;
      if (padding > 0) parts.push_back(torch::zeros({padding}, parts.front().options()));
      bucket.reduced_chunk = group->group->reduce_scatter_sum(torch::cat(parts));  // [chunk]
      if (dp > 1) bucket.reduced_chunk.div_(static_cast<double>(dp));
      for (size_t p : bucket.pieces) {
        Piece& piece = layout.pieces[p];
        piece.values.mutable_grad() = bucket.reduced_chunk.narrow(0, piece.chunk_offset, piece.values.numel());
      }
    }
  }
}

Tensor DistributedOptimizer::squared_gradient_norm() const {
  const Layout& layout = *layout_;
  // [dense, expert] sums of squares; each is complete once summed over the ranks that hold
  // disjoint parts of it: shards over their group, experts over the ep group.
  const torch::Device device = layout.slots.front().parameter.device();
  Tensor dense, expert;
  if (!shard_) {
    dense = squared_gradient_sum(gradients_holders(layout.slots, layout.dense.slots, true), device);
    expert = squared_gradient_sum(gradients_holders(layout.slots, layout.expert.slots, true), device);
  } else {
    dense = sum_over(parallel_.dp, squared_gradient_sum(layout.piece_values(layout.dense, true), device));
    expert = sum_over(parallel_.edp, squared_gradient_sum(layout.piece_values(layout.expert, true), device));
  }
  expert = sum_over(parallel_.ep, expert);
  return sum_over(parallel_.pp, dense + expert);
}

double DistributedOptimizer::gradient_norm() const { return std::sqrt(squared_gradient_norm().item<double>()); }

void DistributedOptimizer::step(double max_norm, double norm) {
  const Layout& layout = *layout_;
  if (!shard_) {
    scale_gradients_to_norm(layout.all_parameters(), max_norm, norm);
    adamw_->step();
    return;
  }
  std::vector<Tensor> pieces = layout.piece_values(layout.dense, false);
  for (const Tensor& t : layout.piece_values(layout.expert, false)) pieces.push_back(t);
  scale_gradients_to_norm(pieces, max_norm, norm);
  adamw_->step();
  torch::NoGradGuard no_grad;
  for (const ReduceGroup* group : {&layout.dense, &layout.expert}) {
    for (const Bucket& bucket : group->buckets) {
      Tensor own = torch::zeros({bucket.chunk}, layout.slots[bucket.slots.front()].parameter.options());  // [chunk]
      for (size_t p : bucket.pieces) {
        const Piece& piece = layout.pieces[p];
        own.narrow(0, piece.chunk_offset, piece.values.numel()).copy_(piece.values);
      }
      const Tensor gathered = group->group->all_gather(own);  // [size x chunk]
      for (size_t k = 0; k < bucket.slots.size(); ++k) {
        Tensor parameter = layout.slots[bucket.slots[k]].parameter.detach();
        parameter.view(-1).copy_(gathered.narrow(0, bucket.offsets[k], parameter.numel()));
      }
    }
  }
}

checkpoint::NamedTensors DistributedOptimizer::state_by_name() const {
  if (!shard_) return experts_.to_global(optimizer_state_by_name(model_, *adamw_), parallel_.ep);
  const Layout& layout = *layout_;
  auto& states = adamw_->state();
  const auto state_of = [&](const Piece& piece) -> const torch::optim::AdamWParamState* {
    const auto it = states.find(piece.values.unsafeGetTensorImpl());
    return it == states.end() ? nullptr : static_cast<const torch::optim::AdamWParamState*>(it->second.get());
  };
  std::map<size_t, checkpoint::NamedTensors> by_slot;
  for (const ReduceGroup* group : {&layout.dense, &layout.expert}) {
    // The step count of each parameter, from the rank holding its first element (0: no state).
    if (group->slots.empty()) continue;
    std::vector<double> own_steps(group->slots.size(), 0.0);
    for (size_t j = 0; j < group->slots.size(); ++j) {
      for (size_t p : layout.pieces_of_slot[group->slots[j]]) {
        const auto* state = state_of(layout.pieces[p]);
        if (layout.pieces[p].begin == 0 && state) own_steps[j] = static_cast<double>(state->step());
      }
    }
    Tensor steps = torch::tensor(own_steps, torch::kDouble).to(layout.slots.front().parameter.device());
    group->group->all_reduce_sum(steps);
    steps = steps.to(torch::kCPU);
    for (size_t j = 0; j < group->slots.size(); ++j) {
      const int64_t step = static_cast<int64_t>(steps[static_cast<int64_t>(j)].item<double>());
      if (step == 0) continue;
      const Slot& slot = layout.slots[group->slots[j]];
      checkpoint::NamedTensors& entries = by_slot[group->slots[j]];
      for (const bool first_moment : {true, false}) {
        // Zeros outside this rank's pieces: the group's sum is the whole tensor, exactly.
        Tensor whole = torch::zeros({slot.parameter.numel()}, slot.parameter.options());
        for (size_t p : layout.pieces_of_slot[group->slots[j]]) {
          const Piece& piece = layout.pieces[p];
          if (const auto* state = state_of(piece)) {
            whole.narrow(0, piece.begin, piece.values.numel()).copy_(first_moment ? state->exp_avg() : state->exp_avg_sq());
          }
        }
        group->group->all_reduce_sum(whole);
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
  const checkpoint::NamedTensors local = experts_.to_local(global);
  if (!shard_) {
    load_optimizer_state_by_name(model_, *adamw_, local, source);
    return;
  }
  const Layout& layout = *layout_;
  std::map<std::string, Tensor> by_name(local.begin(), local.end());
  const auto take = [&](const std::string& name) {
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error(source + ": optimizer state lacks '" + name + "'");
    Tensor t = it->second;
    by_name.erase(it);
    return t;
  };
  auto& states = adamw_->state();
  states.clear();
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
      const auto own = [&](const Tensor& t) {
        return t.reshape(-1).narrow(0, piece.begin, piece.values.numel()).to(piece.values.options(), false, true);
      };
      auto state = std::make_unique<torch::optim::AdamWParamState>();
      state->step(step);
      state->exp_avg(own(exp_avg));
      state->exp_avg_sq(own(exp_avg_sq));
      states[piece.values.unsafeGetTensorImpl()] = std::move(state);
    }
  }
  if (!by_name.empty()) {
    throw std::runtime_error(source + ": optimizer state for unknown parameter '" + by_name.begin()->first + "'");
  }
}

int64_t DistributedOptimizer::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& [key, state] : adamw_->state()) {
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*state);
    bytes += s.exp_avg().nbytes() + s.exp_avg_sq().nbytes();
  }
  return bytes;
}

}  // namespace yuanmoe::train
