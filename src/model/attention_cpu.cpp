// Causal softmax attention on the CPU: query blocks of one (batch row, head) on one thread.
#include "yuanmoe/model/attention_cpu.h"

#include "yuanmoe/core/fast_exp.h"
#include "yuanmoe/core/lane_sum.h"
#include "yuanmoe/core/parallel.h"
#include "yuanmoe/core/small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <torch/csrc/autograd/custom_function.h>
#include <vector>

namespace yuanmoe::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Query rows per block. PyTorch's CPU flash attention takes 64 for 192 <= S < 768; a block's
/// scores against up to 256 keys (64 KiB in fp32) stay in the L2 cache between the GEMMs.
constexpr int64_t kQueryBlock = 64;

/// The longest sequence the kernel takes. Forward + backward against libtorch 2.11's CPU flash
/// kernel, 4 heads of 128, 2 threads (docs/benchmarks.md, "Attention on the CPU"): 0.68 of its
/// time at S 256, 0.70-0.73 at 1K, 0.96-0.99 at 4K and 1.32 at 16K, where a block's scores
/// against every earlier key (64 x S) outgrow the L2 cache; SDPA keeps its key blocks.
constexpr int64_t kLongestSequence = 1024;

/// One row of raw scores s[0, n) (q . k) whose keys [first, last] are visible: scales them,
/// writes p = exp(scale s - m) / sum in place (0 for the hidden keys) and returns m and sum.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void softmax_row(scalar_t* s, int64_t n, int64_t first, int64_t last, scalar_t scale,
                                    scalar_t* row_max, scalar_t* row_sum) {
  scalar_t* visible = s + first;
  const int64_t count = last - first + 1;
  for (int64_t j = 0; j < count; ++j) visible[j] *= scale;
  const scalar_t m = lane_max(visible, count);
  for (int64_t j = 0; j < count; ++j) visible[j] = exp_of_nonpositive(visible[j] - m);
  const scalar_t sum = lane_total(visible, count);
  for (int64_t j = 0; j < count; ++j) visible[j] /= sum;
  std::fill(s, visible, scalar_t{0});
  std::fill(visible + count, s + n, scalar_t{0});
  *row_max = m;
  *row_sum = sum;
}

/// softmax_row's probabilities again from the row's saved m and sum: the same operations, so
/// the same bits.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void probabilities_row(scalar_t* s, int64_t n, int64_t first, int64_t last, scalar_t scale,
                                          scalar_t m, scalar_t sum) {
  scalar_t* visible = s + first;
  const int64_t count = last - first + 1;
  for (int64_t j = 0; j < count; ++j) visible[j] = exp_of_nonpositive(visible[j] * scale - m) / sum;
  std::fill(s, visible, scalar_t{0});
  std::fill(visible + count, s + n, scalar_t{0});
}

/// d s = scale p (d p - D) over one row, written over d p: the softmax backward with
/// D = sum_j p_j d p_j = d o . o, and the score's scale.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void score_gradient_row(const scalar_t* p, scalar_t* d_p, int64_t n, scalar_t d_o_dot_o,
                                           scalar_t scale) {
  for (int64_t j = 0; j < n; ++j) d_p[j] = p[j] * (d_p[j] - d_o_dot_o) * scale;
}

/// The first key each query sees, per batch row: the start of its document, 0 without documents.
Tensor first_visible_keys(const Tensor& document_ids_BS, int64_t batch, int64_t seq) {
  Tensor first = torch::zeros({batch, seq}, torch::kLong);
  if (!document_ids_BS.defined()) return first;
  const Tensor ids = document_ids_BS.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  int64_t* out = first.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 1; i < seq; ++i) {
      const int64_t t = b * seq + i;
      out[t] = id[t] == id[t - 1] ? out[t - 1] : i;
    }
  }
  return first;
}

/// [S, Dh] of one (batch row, head) of a [B, S, H, Dh] tensor.
Tensor head_rows(const Tensor& x_BSHDh, int64_t b, int64_t h) { return x_BSHDh.select(0, b).select(1, h); }

struct CausalAttentionCpu : public torch::autograd::Function<CausalAttentionCpu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q_BSHDh, const Tensor& k_BSHDh,
                               const Tensor& v_BSHDh, const Tensor& first_key_BS) {
    RECORD_FUNCTION("yuanmoe::causal_attention", std::vector<c10::IValue>{});
    const Tensor q = q_BSHDh.detach(), k = k_BSHDh.detach(), v = v_BSHDh.detach();
    const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), head_dim = q.size(3);
    Tensor out_BSHDh = torch::empty({batch, seq, heads, v.size(3)}, q.options());
    Tensor row_max_BHS = torch::empty({batch, heads, seq}, q.options());
    Tensor row_sum_BHS = torch::empty({batch, heads, seq}, q.options());
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_cpu", [&] {
      const auto scale = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(head_dim)));
      const int64_t* first_key = first_key_BS.const_data_ptr<int64_t>();
      parallel_for_with_caller_state(0, batch * heads, 1, [&](int64_t first_pair, int64_t last_pair) {
        Tensor scores = torch::empty({kQueryBlock * seq}, q.options());
        Tensor k_DS = torch::empty({head_dim, seq}, q.options());
        for (int64_t pair = first_pair; pair < last_pair; ++pair) {
          const int64_t b = pair / heads, h = pair % heads;
          const Tensor q_SD = head_rows(q, b, h), v_SD = head_rows(v, b, h);
          transpose_into(k_DS, head_rows(k, b, h));
          const Tensor out_SD = head_rows(out_BSHDh, b, h);
          const int64_t* first = first_key + b * seq;
          scalar_t* m = row_max_BHS.data_ptr<scalar_t>() + pair * seq;
          scalar_t* sum = row_sum_BHS.data_ptr<scalar_t>() + pair * seq;
          for (int64_t r0 = 0; r0 < seq; r0 += kQueryBlock) {
            const int64_t rows = std::min(kQueryBlock, seq - r0), c0 = first[r0], keys = r0 + rows - c0;
            Tensor p = scores.narrow(0, 0, rows * keys).view({rows, keys});
            small_mm_into(p, q_SD.narrow(0, r0, rows), k_DS.narrow(1, c0, keys));
            scalar_t* p_rows = p.data_ptr<scalar_t>();
            for (int64_t i = r0; i < r0 + rows; ++i) {
              softmax_row(p_rows + (i - r0) * keys, keys, first[i] - c0, i - c0, scale, m + i, sum + i);
            }
            small_mm_into(out_SD.narrow(0, r0, rows), p, v_SD.narrow(0, c0, keys));
          }
        }
      });
    });
    ctx->save_for_backward({q, k, v, out_BSHDh, row_max_BHS, row_sum_BHS, first_key_BS});
    return {out_BSHDh};
  }

  // Per query block, with P its probabilities (recomputed), dO the output's gradient and
  // D_i = dO_i . O_i: dV += P^T dO, dP = dO V^T, dS = scale P (dP - D), dQ = dS K, dK += dS^T Q.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3];
    const Tensor &row_max_BHS = saved[4], &row_sum_BHS = saved[5], &first_key_BS = saved[6];
    const Tensor d_out = grad_outputs[0].contiguous();
    const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), head_dim = q.size(3);
    const int64_t value_dim = v.size(3);
    Tensor d_q = torch::empty_like(q, at::MemoryFormat::Contiguous);
    Tensor d_k = torch::zeros_like(k, at::MemoryFormat::Contiguous);
    Tensor d_v = torch::zeros_like(v, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_cpu_backward", [&] {
      const auto scale = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(head_dim)));
      const int64_t* first_key = first_key_BS.const_data_ptr<int64_t>();
      parallel_for_with_caller_state(0, batch * heads, 1, [&](int64_t first_pair, int64_t last_pair) {
        Tensor scores = torch::empty({kQueryBlock * seq}, q.options());
        Tensor score_grads = torch::empty({kQueryBlock * seq}, q.options());
        Tensor k_DS = torch::empty({head_dim, seq}, q.options()), v_DS = torch::empty({value_dim, seq}, q.options());
        std::vector<scalar_t> d_o_dot_o(seq);
        for (int64_t pair = first_pair; pair < last_pair; ++pair) {
          const int64_t b = pair / heads, h = pair % heads;
          const Tensor q_SD = head_rows(q, b, h), k_SD = head_rows(k, b, h);
          transpose_into(k_DS, k_SD);
          transpose_into(v_DS, head_rows(v, b, h));
          const Tensor d_out_SD = head_rows(d_out, b, h), out_SD = head_rows(out, b, h);
          Tensor d_q_SD = head_rows(d_q, b, h), d_k_SD = head_rows(d_k, b, h), d_v_SD = head_rows(d_v, b, h);
          const int64_t* first = first_key + b * seq;
          const scalar_t* m = row_max_BHS.const_data_ptr<scalar_t>() + pair * seq;
          const scalar_t* sum = row_sum_BHS.const_data_ptr<scalar_t>() + pair * seq;
          const int64_t row_stride = heads * value_dim;  // of d_out and out, both contiguous
          const scalar_t* d_o = d_out_SD.const_data_ptr<scalar_t>();
          const scalar_t* o = out_SD.const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < seq; ++i) {
            d_o_dot_o[i] = lane_dot(d_o + i * row_stride, o + i * row_stride, value_dim);
          }
          for (int64_t r0 = 0; r0 < seq; r0 += kQueryBlock) {
            const int64_t rows = std::min(kQueryBlock, seq - r0), c0 = first[r0], keys = r0 + rows - c0;
            const Tensor q_block = q_SD.narrow(0, r0, rows), d_out_block = d_out_SD.narrow(0, r0, rows);
            Tensor p = scores.narrow(0, 0, rows * keys).view({rows, keys});
            Tensor d_s = score_grads.narrow(0, 0, rows * keys).view({rows, keys});
            small_mm_into(p, q_block, k_DS.narrow(1, c0, keys));
            small_mm_into(d_s, d_out_block, v_DS.narrow(1, c0, keys));
            scalar_t* p_rows = p.data_ptr<scalar_t>();
            scalar_t* d_s_rows = d_s.data_ptr<scalar_t>();
            for (int64_t i = r0; i < r0 + rows; ++i) {
              scalar_t* p_row = p_rows + (i - r0) * keys;
              probabilities_row(p_row, keys, first[i] - c0, i - c0, scale, m[i], sum[i]);
              score_gradient_row(p_row, d_s_rows + (i - r0) * keys, keys, d_o_dot_o[i], scale);
            }
            small_mm_add_into(d_v_SD.narrow(0, c0, keys), p.t(), d_out_block);
            small_mm_into(d_q_SD.narrow(0, r0, rows), d_s, k_SD.narrow(0, c0, keys));
            small_mm_add_into(d_k_SD.narrow(0, c0, keys), d_s.t(), q_block);
          }
        }
      });
    });
    return {d_q, d_k, d_v, Tensor()};
  }
};

}  // namespace

bool causal_attention_cpu_applies(const Tensor& q_BSHDh, const Tensor& k_BSHDh, const Tensor& v_BSHDh,
                                  const Tensor& document_ids_BS) {
  const auto dtype = q_BSHDh.scalar_type();
  if (!q_BSHDh.device().is_cpu() || (dtype != torch::kFloat && dtype != torch::kDouble)) return false;
  if (k_BSHDh.scalar_type() != dtype || v_BSHDh.scalar_type() != dtype) return false;
  if (q_BSHDh.dim() != 4 || q_BSHDh.size(1) > kLongestSequence || k_BSHDh.sizes() != q_BSHDh.sizes() ||
      v_BSHDh.dim() != 4 ||
      v_BSHDh.sizes().slice(0, 3) != q_BSHDh.sizes().slice(0, 3)) {
    return false;
  }
  if (!document_ids_BS.defined()) return true;
  if (!document_ids_BS.device().is_cpu()) return false;
  const Tensor ids = document_ids_BS.to(torch::kLong);
  const int64_t seq = ids.size(1);
  return seq < 2 || (ids.narrow(1, 1, seq - 1) >= ids.narrow(1, 0, seq - 1)).all().item<bool>();
}

Tensor causal_attention_cpu(const Tensor& q_BSHDh, const Tensor& k_BSHDh, const Tensor& v_BSHDh,
                            const Tensor& document_ids_BS) {
  TORCH_CHECK(causal_attention_cpu_applies(q_BSHDh, k_BSHDh, v_BSHDh, document_ids_BS),
              "causal_attention_cpu: expected fp32 or fp64 q, k, v of one shape on the CPU and contiguous documents");
  // BLAS takes rows at any stride, but not a strided last dimension.
  auto unit_last = [](const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); };
  const Tensor first_key_BS = first_visible_keys(document_ids_BS, q_BSHDh.size(0), q_BSHDh.size(1));
  return CausalAttentionCpu::apply(unit_last(q_BSHDh), unit_last(k_BSHDh), unit_last(v_BSHDh), first_key_BS)[0];
}

}  // namespace yuanmoe::model
