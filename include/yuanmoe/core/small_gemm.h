// Products of a few dozen rows on one thread: an expert's rows, an attention block.
#pragma once

#include "yuanmoe/core/types.h"

namespace yuanmoe {

/// out = a b, written into `out` (a view into a larger tensor, hence by value). `a` may have any
/// strides (a transposed view costs nothing); `b` and `out` need unit stride along their rows.
///
/// For fp32 on a CPU with AVX-512 or AVX2 this is a register-blocked kernel of our own: 6 rows of
/// `out` x 64 columns in 24 vector accumulators (AVX2: 6 x 16 in 12), each element one chain of
/// fused multiply-adds over k in order, so both give the same bits; `a` broadcast straight from
/// its strides and `b` read in place, nothing packed. At 64 rows x 256 x 512 on one thread the
/// AVX-512 kernel measured 84-86 GFLOP/s against MKL's 55-62, which stays near 70 even with the
/// weights packed beforehand (docs/benchmarks.md, "Experts on the CPU"). Anything else goes to
/// at::mm_out.
void small_mm_into(Tensor out, const Tensor& a, const Tensor& b);

/// out += a b, the same way: with the kernel each element's chain starts from its value in out.
void small_mm_add_into(Tensor out, const Tensor& a, const Tensor& b);

/// dst = src^T for 2-D floating-point tensors on the CPU, any strides: the operands above, copied
/// in 16 x 16 blocks so that both sides are read and written a cache line at a time (ATen's copy
/// of a strided transposed view goes element by element). In fp32 with AVX-512 or AVX2, between
/// rows of unit stride, full blocks are transposed in registers: 2.5-5x faster than element by
/// element with AVX-512 (bench/results/2026-12-07d-small-gemm).
void transpose_into(Tensor dst, const Tensor& src);

/// The instruction sets the kernels above are written for.
enum class CpuKernelIsa { kNone, kAvx2, kAvx512 };

/// The best of them this CPU runs; kNone: products go to at::mm_out, copies element by element.
CpuKernelIsa cpu_kernel_isa();

/// out (+)= a b and dst = src^T with the kernels of a given instruction set, one this CPU runs
/// (at most cpu_kernel_isa()): tests check each kernel on every CPU that can run it.
void small_mm_into(Tensor out, const Tensor& a, const Tensor& b, bool add, CpuKernelIsa isa);
void transpose_into(Tensor dst, const Tensor& src, CpuKernelIsa isa);

}  // namespace yuanmoe
