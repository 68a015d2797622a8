// Values a run derives from its config and its data-parallel size, resolved once
// (resolve_derived) and handed to what reads them.
#pragma once

#include <cstdint>

#include "yuanmoe/config/config.h"

namespace yuanmoe::config {

struct DerivedValues {
  int64_t micro_batches_per_step = 1;  // global_batch_size / micro_batch_size, all ranks together
  int64_t micro_batches_per_rank = 1;  // m: each data-parallel rank's share of them
  int64_t tokens_per_step = 0;         // global_batch_size x seq_length
};

/// The batch sizes must be validated first (validate_training: the global batch splits into
/// micro-batches of every data-parallel rank).
inline DerivedValues resolve_derived(const RunConfig& run, int64_t data_parallel_size) {
  DerivedValues d;
  d.micro_batches_per_step = run.train.global_batch_size / run.train.micro_batch_size;
  d.micro_batches_per_rank = d.micro_batches_per_step / data_parallel_size;
  d.tokens_per_step = run.train.global_batch_size * run.train.seq_length;
  return d;
}

}  // namespace yuanmoe::config
