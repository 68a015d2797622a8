// Products of a few dozen rows on one thread: an expert's rows, an attention block.
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe {

/// out = a b, written into `out` (a view into a larger tensor, hence by value). `a` may have any
/// strides (a transposed view costs nothing); `b` and `out` need unit stride along their rows.
///
/// For fp32 on a CPU with AVX-512 this is a register-blocked kernel of our own: 6 rows of `out` x
/// 64 columns in 24 vector accumulators, each element one chain of fused multiply-adds over k in
/// order, `a` broadcast straight from its strides and `b` read in place, nothing packed. At 64
/// rows x 256 x 512 on one thread it measured 75-86 GFLOP/s against MKL's 46-62
/// (docs/benchmarks.md, "Experts on the CPU"): BLAS packs both operands on every call, which at
/// this size costs as much as the product. Anything else goes to at::mm_out.
void small_mm_into(Tensor out, const Tensor& a, const Tensor& b);

/// Whether fp32 products on this CPU take the kernel above (for tests and bench).
bool small_mm_kernel_available();

}  // namespace yuanmoe
