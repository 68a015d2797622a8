#include "yuanmoe/model/experts.h"

#include "yuanmoe/core/fast_exp.h"
#include "yuanmoe/core/parallel.h"
#include "yuanmoe/core/small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/autocast_mode.h>
#include <algorithm>
#include <atomic>
#include <functional>
#include <torch/csrc/autograd/custom_function.h>

namespace yuanmoe::model {

Tensor swiglu(const Tensor& x_TD, const Tensor& w1_2FD, const Tensor& w2_DF) {
  const Tensor u_T2F = torch::matmul(x_TD, w1_2FD.t());
  const int64_t ffn = w1_2FD.size(0) / 2;
  const Tensor h_TF = torch::silu(u_T2F.narrow(-1, 0, ffn)) * u_T2F.narrow(-1, ffn, ffn);
  return torch::matmul(h_TF, w2_DF.t());
}

DenseMlpImpl::DenseMlpImpl(int64_t hidden_size, int64_t ffn_hidden_size) {
  w1 = register_module(
      "w1", linear_without_bias(hidden_size, 2 * ffn_hidden_size));
  w2 = register_module(
      "w2", linear_without_bias(ffn_hidden_size, hidden_size));
}

Tensor DenseMlpImpl::forward(const Tensor& x) { return swiglu(x, w1->weight, w2->weight); }

GroupedExpertsImpl::GroupedExpertsImpl(int64_t num_experts, int64_t hidden_size, int64_t ffn_hidden_size,
                                       config::ExpertGemm gemm)
    : gemm_(gemm) {
  // Values are written by init_weights(); empty() would leave garbage, so start from zeros.
  w1 = register_parameter("w1", torch::zeros({num_experts, 2 * ffn_hidden_size, hidden_size}));
  w2 = register_parameter("w2", torch::zeros({num_experts, hidden_size, ffn_hidden_size}));
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// out = a b, written into `out` (a slice of a larger tensor, hence by value).
void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

/// The first row of each expert's block: the prefix sums of rows_per_expert.
std::vector<int64_t> row_starts(const std::vector<int64_t>& rows_per_expert) {
  std::vector<int64_t> starts(rows_per_expert.size() + 1, 0);
  for (size_t e = 0; e < rows_per_expert.size(); ++e) starts[e + 1] = starts[e] + rows_per_expert[e];
  return starts;
}

/// Calls fn(e, first_row, rows) for every expert with rows. On CPU each expert runs on one thread:
/// for GEMMs of ~64 rows this beats splitting each GEMM over the threads (docs/benchmarks.md,
/// "Experts on the CPU"). The threads pull experts from one queue, most rows first (longest
/// processing time first), so they finish within about one small expert of each other: an
/// expert's cost is not proportional to its rows (its weights are read whatever their number).
/// Which thread runs an expert does not change its arithmetic. Callers write disjoint rows and
/// disjoint experts.
void for_each_expert(const std::vector<int64_t>& rows_per_expert, bool on_cpu,
                     const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const std::vector<int64_t> starts = row_starts(rows_per_expert);
  const auto experts = static_cast<int64_t>(rows_per_expert.size());
  const int64_t threads = on_cpu ? std::min<int64_t>(at::get_num_threads(), experts) : 1;
  if (threads <= 1) {
    for (int64_t e = 0; e < experts; ++e) {
      if (rows_per_expert[e] > 0) fn(e, starts[e], rows_per_expert[e]);
    }
    return;
  }
  std::vector<int64_t> queue;
  for (int64_t e = 0; e < experts; ++e) {
    if (rows_per_expert[e] > 0) queue.push_back(e);
  }
  std::stable_sort(queue.begin(), queue.end(),
                   [&](int64_t a, int64_t b) { return rows_per_expert[a] > rows_per_expert[b]; });
  std::atomic<size_t> next{0};
  parallel_for_with_caller_state(0, threads, 1, [&](int64_t /*first*/, int64_t /*last*/) {
    for (size_t i = next.fetch_add(1); i < queue.size(); i = next.fetch_add(1)) {
      const int64_t e = queue[i];
      fn(e, starts[e], rows_per_expert[e]);
    }
  });
}

/// sigmoid(a) from exp(-|a|), which cannot overflow.
template <typename scalar_t>
inline scalar_t sigmoid_of(scalar_t a) {
  const scalar_t e = exp_of_nonpositive(a >= 0 ? -a : a);
  return (a >= 0 ? scalar_t{1} : e) / (scalar_t{1} + e);
}

/// h = silu(a) b over rows of u = [a | b], one pass (the CPU's loop for one expert's rows).
template <typename scalar_t>
YUANMOE_AVX2_CLONE void swiglu_rows(const scalar_t* u, int64_t rows, int64_t ffn, scalar_t* h) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t *a = u + r * 2 * ffn, *b = a + ffn;
    scalar_t* h_r = h + r * ffn;
    for (int64_t i = 0; i < ffn; ++i) h_r[i] = a[i] * sigmoid_of(a[i]) * b[i];
  }
}

/// One row of the activation's backward: d_a = d_h b silu'(a) and d_b = d_h silu(a), and
/// h = silu(a) b, with silu'(a) = s (1 + a (1 - s)) and s = sigmoid(a). The halves and rows are
/// disjoint; restrict says so, or the compiler does not vectorise the loop.
template <typename scalar_t>
inline void swiglu_backward_row(const scalar_t* __restrict a, const scalar_t* __restrict b,
                                const scalar_t* __restrict d_h, int64_t ffn, scalar_t* __restrict d_a,
                                scalar_t* __restrict d_b, scalar_t* __restrict h) {
  for (int64_t i = 0; i < ffn; ++i) {
    const scalar_t sig = sigmoid_of(a[i]), silu = a[i] * sig;
    d_b[i] = d_h[i] * silu;
    d_a[i] = d_h[i] * b[i] * (sig * (scalar_t{1} + a[i] * (scalar_t{1} - sig)));
    h[i] = silu * b[i];
  }
}

/// The activation's backward over rows of u = [a | b] and d_u = [d_a | d_b], one pass.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void swiglu_backward_rows(const scalar_t* d_h, const scalar_t* u, int64_t rows, int64_t ffn,
                                             scalar_t* d_u, scalar_t* h) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* a = u + r * 2 * ffn;
    scalar_t* d_a = d_u + r * 2 * ffn;
    swiglu_backward_row(a, a + ffn, d_h + r * ffn, ffn, d_a, d_a + ffn, h + r * ffn);
  }
}

/// Whether the activation takes the loops above: contiguous fp32 or fp64 rows on the CPU.
bool swiglu_rows_apply(const Tensor& u_M2F) {
  return u_M2F.device().is_cpu() && u_M2F.is_contiguous() &&
         (u_M2F.scalar_type() == torch::kFloat || u_M2F.scalar_type() == torch::kDouble);
}

/// h = silu(a) * b over rows of u = [a | b].
Tensor swiglu_activation(const Tensor& u_M2F) {
  const int64_t ffn = u_M2F.size(1) / 2;
  if (swiglu_rows_apply(u_M2F)) {
    Tensor h_MF = torch::empty({u_M2F.size(0), ffn}, u_M2F.options());
    AT_DISPATCH_FLOATING_TYPES(u_M2F.scalar_type(), "swiglu_rows", [&] {
      swiglu_rows(u_M2F.const_data_ptr<scalar_t>(), u_M2F.size(0), ffn, h_MF.data_ptr<scalar_t>());
    });
    return h_MF;
  }
  return torch::silu(u_M2F.narrow(1, 0, ffn)).mul_(u_M2F.narrow(1, ffn, ffn));
}

/// The SwiGLU activation's backward over rows: writes d_u = [d_a | d_b] from d_h and u, and returns
/// h = silu(a) b, which the weight gradient of the second GEMM needs (recomputed, not saved).
/// silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a).
Tensor swiglu_activation_backward(const Tensor& d_h_MF, const Tensor& u_M2F, Tensor d_u_M2F) {
  const int64_t ffn = d_h_MF.size(1);
  if (swiglu_rows_apply(u_M2F) && d_h_MF.is_contiguous() && d_u_M2F.is_contiguous()) {
    Tensor h_MF = torch::empty_like(d_h_MF);
    AT_DISPATCH_FLOATING_TYPES(u_M2F.scalar_type(), "swiglu_backward_rows", [&] {
      swiglu_backward_rows(d_h_MF.const_data_ptr<scalar_t>(), u_M2F.const_data_ptr<scalar_t>(), u_M2F.size(0), ffn,
                           d_u_M2F.data_ptr<scalar_t>(), h_MF.data_ptr<scalar_t>());
    });
    return h_MF;
  }
  const Tensor a = u_M2F.narrow(1, 0, ffn), b = u_M2F.narrow(1, ffn, ffn);
  const Tensor sigmoid_a = torch::sigmoid(a), silu_a = a * sigmoid_a;
  Tensor d_a = d_u_M2F.narrow(1, 0, ffn), d_b = d_u_M2F.narrow(1, ffn, ffn);
  at::mul_out(d_b, d_h_MF, silu_a);
  at::mul_out(d_a, d_h_MF, torch::rsub(sigmoid_a, 1).mul_(a).add_(1).mul_(sigmoid_a).mul_(b));
  return silu_a.mul_(b);
}

/// One expert's forward on the CPU, on one thread, transposed: u^T = w1 x^T, h^T = act(u^T),
/// y^T = w2 h^T. The weights are then the broadcast operand of small_mm_into, read in place as
/// stored, and the rows the vector operand: no GEMM packs or transposes a weight, only the rows
/// (x and y, n x D each) are transposed. The expert's block of u (n rows of 2F, contiguous) holds
/// u^T [2F, n], the layout the backward reads; the activation runs over it as one row [a | b] of
/// F n values each.
void expert_forward_cpu(const Tensor& x_nD, const Tensor& w1_2FD, const Tensor& w2_DF, const Tensor& u_block,
                        Tensor y_nD) {
  const int64_t n = x_nD.size(0), ffn = w2_DF.size(1);
  Tensor x_Dn = torch::empty({x_nD.size(1), n}, x_nD.options());
  transpose_into(x_Dn, x_nD);
  const Tensor u_2Fn = u_block.view({2 * ffn, n});
  small_mm_into(u_2Fn, w1_2FD, x_Dn);
  const Tensor h_Fn = swiglu_activation(u_2Fn.view({1, 2 * ffn * n})).view({ffn, n});
  Tensor y_Dn = torch::empty({w2_DF.size(0), n}, x_nD.options());
  small_mm_into(y_Dn, w2_DF, h_Fn);
  transpose_into(y_nD, y_Dn);
}

/// One expert's backward on the CPU, in the forward's transposed layout: d_h^T = w2^T d_y^T (w2
/// read through a transposed view), the activation's backward over d_u^T's block (which also gives
/// h^T), then d_w2 = d_y^T h, d_x = d_u w1 (d_u^T read through a transposed view) and
/// d_w1 = d_u^T x.
void expert_backward_cpu(const Tensor& d_y_nD, const Tensor& x_nD, const Tensor& w1_2FD, const Tensor& w2_DF,
                         const Tensor& u_block, const Tensor& d_u_block, Tensor d_x_nD, Tensor d_w1_2FD,
                         Tensor d_w2_DF) {
  const int64_t n = x_nD.size(0), ffn = w2_DF.size(1);
  Tensor d_y_Dn = torch::empty({d_y_nD.size(1), n}, x_nD.options());
  transpose_into(d_y_Dn, d_y_nD);
  Tensor d_h_Fn = torch::empty({ffn, n}, x_nD.options());
  small_mm_into(d_h_Fn, w2_DF.t(), d_y_Dn);
  const Tensor d_u_2Fn = d_u_block.view({2 * ffn, n});
  const Tensor h_Fn = swiglu_activation_backward(d_h_Fn.view({1, ffn * n}), u_block.view({1, 2 * ffn * n}),
                                                 d_u_2Fn.view({1, 2 * ffn * n}))
                          .view({ffn, n});
  Tensor h_nF = torch::empty({n, ffn}, x_nD.options());
  transpose_into(h_nF, h_Fn);
  small_mm_into(d_w2_DF, d_y_Dn, h_nF);
  small_mm_into(d_x_nD, d_u_2Fn.t(), w1_2FD);
  small_mm_into(d_w1_2FD, d_u_2Fn, x_nD);
}

/// The experts' SwiGLU over rows grouped by expert, with a hand-written backward: GEMMs write
/// straight into slices of one output (no per-expert tensors, no cat, no per-expert gradient
/// stacks), and only x and the pre-activation u are kept for backward. Megatron's GroupedMLP does
/// the same with grouped GEMM kernels.
///
/// On the CPU each expert's whole chain (both GEMMs, the activation, and in the backward its four
/// GEMMs and the activation's derivative) runs on one thread while its rows are in cache, in the
/// transposed layout of expert_forward_cpu (each expert's block of the saved u holds u^T): over
/// all 2,048 rows of a tiny-m32 micro-batch at once, the activation's backward measured 3.8x
/// slower than expert by expert (one thread). Elsewhere each stage runs once over all rows, so the
/// activation is a handful of kernels, not a handful per expert.
struct GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& xs_MD, const Tensor& w1_E2FD, const Tensor& w2_EDF,
                               const std::vector<int64_t>& rows_per_expert) {
    // One profiler event around the work the intra-op threads share: its wall time (the
    // backward's is the autograd node's event).
    RECORD_FUNCTION("yuanmoe::grouped_swiglu", std::vector<c10::IValue>{});
    const Tensor xs = xs_MD.detach().contiguous(), w1 = w1_E2FD.detach(), w2 = w2_EDF.detach();
    const int64_t rows = xs.size(0), ffn = w2.size(2);
    const bool on_cpu = xs.device().is_cpu();
    Tensor u_M2F = torch::empty({rows, 2 * ffn}, xs.options());
    Tensor ys_MD = torch::empty({rows, w2.size(1)}, xs.options());
    if (on_cpu) {
      for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
        expert_forward_cpu(xs.narrow(0, first, n), w1[e], w2[e], u_M2F.narrow(0, first, n),
                           ys_MD.narrow(0, first, n));
      });
    } else {
      for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
        mm_into(u_M2F.narrow(0, first, n), xs.narrow(0, first, n), w1[e].t());
      });
      const Tensor h_MF = swiglu_activation(u_M2F);
      for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
        mm_into(ys_MD.narrow(0, first, n), h_MF.narrow(0, first, n), w2[e].t());
      });
    }
    ctx->save_for_backward({xs, w1, w2, u_M2F});
    ctx->saved_data["rows"] = rows_per_expert;
    return {ys_MD};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &xs = saved[0], &w1 = saved[1], &w2 = saved[2], &u_M2F = saved[3];
    const std::vector<int64_t> rows_per_expert = ctx->saved_data["rows"].toIntVector();
    const Tensor d_ys = grad_outputs[0].contiguous();
    const bool on_cpu = xs.device().is_cpu();

    // Weight gradients start empty: every expert with rows writes its whole slice, the rest are
    // zeroed (a full zero-fill would be one more pass over all experts' weights).
    Tensor d_u = torch::empty_like(u_M2F);
    Tensor d_xs = torch::empty_like(xs), d_w1 = torch::empty_like(w1), d_w2 = torch::empty_like(w2);
    for (size_t e = 0; e < rows_per_expert.size(); ++e) {
      if (rows_per_expert[e] == 0) {
        d_w1[static_cast<int64_t>(e)].zero_();
        d_w2[static_cast<int64_t>(e)].zero_();
      }
    }
    if (on_cpu) {
      for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
        expert_backward_cpu(d_ys.narrow(0, first, n), xs.narrow(0, first, n), w1[e], w2[e],
                            u_M2F.narrow(0, first, n), d_u.narrow(0, first, n), d_xs.narrow(0, first, n), d_w1[e],
                            d_w2[e]);
      });
    } else {
      // d_h = d_ys w2; then the activation's backward gives d_u (and h); then d_w2 = d_ys^T h,
      // d_xs = d_u w1, d_w1 = d_u^T xs.
      Tensor d_h = torch::empty({xs.size(0), w2.size(2)}, xs.options());
      for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
        mm_into(d_h.narrow(0, first, n), d_ys.narrow(0, first, n), w2[e]);
      });
      const Tensor h_MF = swiglu_activation_backward(d_h, u_M2F, d_u);
      for_each_expert(rows_per_expert, on_cpu, [&](int64_t e, int64_t first, int64_t n) {
        const Tensor d_u_e = d_u.narrow(0, first, n);
        mm_into(d_w2[e], d_ys.narrow(0, first, n).t(), h_MF.narrow(0, first, n));
        mm_into(d_xs.narrow(0, first, n), d_u_e, w1[e]);
        mm_into(d_w1[e], d_u_e.t(), xs.narrow(0, first, n));
      });
    }
    return {d_xs, d_w1, d_w2, Tensor()};
  }
};

}  // namespace

Tensor GroupedExpertsImpl::forward(const ExpertInput& input) {
  return uses_grouped_mm(input.xs_MD) ? forward_grouped_mm(input.xs_MD, input.expert_offsets_E)
                                      : forward_loop(input.xs_MD, input.rows_per_expert);
}

bool GroupedExpertsImpl::uses_grouped_mm(const Tensor& xs) const {
  switch (gemm_) {
    case config::ExpertGemm::kLoop:
      return false;
    case config::ExpertGemm::kGroupedMm:
      return true;
    case config::ExpertGemm::kAuto:
      break;
  }
  const c10::DeviceType device = xs.device().type();
  const torch::Dtype dtype =
      at::autocast::is_autocast_enabled(device) ? at::autocast::get_autocast_dtype(device) : xs.scalar_type();
  return xs.is_cuda() && dtype == torch::kBFloat16;
}

Tensor GroupedExpertsImpl::forward_loop(const Tensor& xs_MD, const std::vector<int64_t>& rows_per_expert) {
  TORCH_CHECK(static_cast<int64_t>(rows_per_expert.size()) == w1.size(0), "GroupedExperts: ", rows_per_expert.size(),
              " row counts for ", w1.size(0), " experts");
  // Under autocast the GEMMs take the autocast dtype, as torch::matmul would; the casts are
  // differentiable outside the function.
  torch::Dtype dtype = xs_MD.scalar_type();
  const c10::DeviceType device_type = xs_MD.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) dtype = at::autocast::get_autocast_dtype(device_type);
  return GroupedSwiGLU::apply(xs_MD.to(dtype), w1.to(dtype), w2.to(dtype), rows_per_expert)[0];
}

Tensor GroupedExpertsImpl::forward_grouped_mm(const Tensor& xs_MD, const Tensor& expert_offsets_E) {
  TORCH_CHECK(expert_offsets_E.size(0) == w1.size(0), "GroupedExperts: ", expert_offsets_E.size(0), " offsets for ",
              w1.size(0), " experts");
  torch::Dtype dtype = xs_MD.scalar_type();
  const c10::DeviceType device_type = xs_MD.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) dtype = at::autocast::get_autocast_dtype(device_type);
  // _grouped_mm multiplies row block e of the first operand by matrix e of the second: the
  // weights as [E, D, 2F] and [E, F, D] views (transposes, no copies).
  const int64_t ffn = w2.size(2);
  const Tensor u_M2F = at::_grouped_mm(xs_MD.to(dtype).contiguous(), w1.to(dtype).transpose(1, 2), expert_offsets_E);
  const Tensor h_MF = torch::silu(u_M2F.narrow(1, 0, ffn)) * u_M2F.narrow(1, ffn, ffn);
  return at::_grouped_mm(h_MF, w2.to(dtype).transpose(1, 2), expert_offsets_E);
}

}  // namespace yuanmoe::model
