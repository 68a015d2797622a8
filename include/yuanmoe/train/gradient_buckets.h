// One group's gradients reduced to their data-parallel mean in buckets, overlapped with the
// backward when parallel.overlap_grad_reduce is on (PyTorch DDP's reducer, Megatron-Core's
// --overlap-grad-reduce; docs/parallelism.md, "Gradient reduction"):
//
//   buckets   the parameters in reverse registration order (about the order the backward
//             produces their gradients), cut at about 25 MB (Megatron's and PyTorch DDP's
//             default); a held parameter (the tied
//             embedding's copy, summed over the embedding group first) alone in the last bucket
//   arm()     before the step's last backward on this stage: from then on each parameter's
//             post-accumulate-grad hook counts it ready, and the buckets whose parameters are all
//             ready are flattened and their collectives started (all-reduce, or reduce-scatter
//             under a shard group), in bucket order only: every rank starts the same collectives
//             in the same order, whatever order its gradients arrive in
//   finish()  after the backward: the started buckets waited for in order, then the rest (a
//             parameter the last backward did not reach; one with no gradient at all gets zeros)
//             started and waited for one at a time; each sum divided by dp and handed over
//
// Off, finish() does every bucket one at a time: the same buckets and the same sums, so a run is
// bit for bit the same with and without overlap; only the moment the collectives start differs.
// The price of overlap is memory: each started bucket's flat copy lives until finish() hands it
// over, up to one more copy of the group's gradients at the end of the backward (off: one bucket).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"
#include "yuanmoe/parallel/process_groups.h"

namespace yuanmoe::train {

struct GradientBucket {
  std::vector<size_t> parameters;  // indices into the constructor's list, in bucket order
  std::vector<int64_t> offsets;    // each one's first element in the bucket
  int64_t elements = 0;
  int64_t chunk = 0;  // ceil(elements / shard size): the bucket is padded to shard size x chunk
  bool held = false;  // started by finish() only
};

/// parallel.grad_bucket_mb in bytes.
int64_t bucket_bytes(const config::ParallelConfig& parallel);

class GradientBuckets {
 public:
  static constexpr int64_t kDefaultBucketBytes = 25 << 20;

  /// `parameters` (with their names, for errors) in registration order; `held`: the index of the
  /// one parameter that finish() alone may start, or -1. `copies`: the ranks holding copies, whose
  /// mean the gradients become; `shard`: copies when sharded, else a group of one. `dp` divides
  /// the sums (an expert's gradient already sums its ep group's tokens: it divides by dp too).
  /// A bucket takes parameters until it holds at least `bucket_bytes`. The hooks are this
  /// object's: one GradientBuckets per parameter at a time.
  GradientBuckets(std::vector<Tensor> parameters, std::vector<std::string> names, int64_t held,
                  const parallel::Group& copies, const parallel::Group& shard, int64_t dp, bool overlap,
                  int64_t bucket_bytes = kDefaultBucketBytes);
  ~GradientBuckets();
  GradientBuckets(const GradientBuckets&) = delete;
  GradientBuckets& operator=(const GradientBuckets&) = delete;

  const std::vector<GradientBucket>& buckets() const { return buckets_; }
  /// Whether there is anything to reduce: more than one copy, or a process group behind them.
  bool active() const { return active_; }

  /// The next backward is the step's last: its hooks start the buckets as they fill (overlap on).
  void arm();
  /// Every bucket reduced (see above), in bucket order: take(b, mean) gets its mean, [chunk]:
  /// this rank's block of it (the whole padded bucket over a shard group of one); nothing keeps
  /// it afterwards. A no-op when not active.
  void finish(const std::function<void(size_t bucket, const Tensor& mean)>& take);
  /// Buckets whose collective has started since arm() (all of them once finish() returned).
  size_t started() const { return next_; }

  /// Seconds finish() took in all (collectives not hidden behind the backward, the division and
  /// handing the means over), and of those, seconds waiting for collectives.
  double finish_seconds() const { return finish_seconds_; }
  double wait_seconds() const { return wait_seconds_; }

 private:
  struct Hook;  // a parameter's post-accumulate-grad hook
  void ready(size_t bucket, size_t parameter);
  void start(size_t bucket);

  std::vector<Tensor> parameters_;
  std::vector<std::string> names_;
  const parallel::Group copies_, shard_;  // handles on the process groups
  const int64_t dp_;
  const bool active_, hooked_;
  std::vector<GradientBucket> buckets_;
  std::vector<size_t> bucket_of_;  // per parameter

  // One step's reduction.
  bool armed_ = false;
  std::vector<char> is_ready_;           // per parameter
  std::vector<size_t> waiting_;          // per bucket: parameters not ready yet
  size_t next_ = 0;                      // the first bucket not started (all started once finished)
  std::vector<parallel::Pending> pending_;  // per bucket in flight (it keeps its input alive)
  std::vector<Tensor> reduced_;          // per bucket in flight: its sum, once pending_ is waited
  double finish_seconds_ = 0.0, wait_seconds_ = 0.0;
};

}  // namespace yuanmoe::train
