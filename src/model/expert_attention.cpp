// The attention router's per-token E x E attention over experts, as one CPU kernel.
#include "yuanmoe/model/expert_attention.h"

#include "yuanmoe/core/fast_exp.h"
#include "yuanmoe/core/lane_sum.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <torch/csrc/autograd/custom_function.h>
#include <vector>

namespace yuanmoe::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Tokens per task of the expert attention's CPU kernel.
constexpr int64_t kRouterTokensPerTask = 16;

/// One token of qkv = [q | k | v]: e[j][i] = exp(q_i k_j - max_j' q_i k_j') (the key index j
/// outer, so the passes over e run along i without reductions). The row maximum is q_i max(k) for
/// q_i >= 0 and q_i min(k) otherwise: rounding keeps q_i k_j monotone in k_j, so that is exactly
/// the largest rounded product.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void token_exponentials(const scalar_t* q, int64_t experts, scalar_t* row_max, scalar_t* e) {
  const scalar_t* k = q + experts;
  const auto [k_min, k_max] = std::minmax_element(k, k + experts);
  const scalar_t smallest = *k_min, largest = *k_max;
  for (int64_t i = 0; i < experts; ++i) row_max[i] = q[i] * (q[i] >= 0 ? largest : smallest);
  for (int64_t j = 0; j < experts; ++j) {
    scalar_t* e_j = e + j * experts;
    for (int64_t i = 0; i < experts; ++i) e_j[i] = exp_of_nonpositive(q[i] * k[j] - row_max[i]);
  }
}

/// sum_i = sum_j e[j][i] and out_i = (sum_j e[j][i] v_j) / sum_i for one token.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void weighted_values(const scalar_t* e, const scalar_t* v, int64_t experts, scalar_t* sum,
                                        scalar_t* out) {
  std::fill(sum, sum + experts, scalar_t{0});
  std::fill(out, out + experts, scalar_t{0});
  for (int64_t j = 0; j < experts; ++j) {
    const scalar_t* e_j = e + j * experts;
    for (int64_t i = 0; i < experts; ++i) {
      sum[i] += e_j[i];
      out[i] += e_j[i] * v[j];
    }
  }
  for (int64_t i = 0; i < experts; ++i) out[i] /= sum[i];
}

/// Writes r_t = sum_j softmax_j(q_i k_j) v_j for the tokens [first, last).
template <typename scalar_t>
void forward_tokens(const scalar_t* qkv, int64_t experts, int64_t first, int64_t last, scalar_t* r) {
  std::vector<scalar_t> e(experts * experts), row_max(experts), sum(experts);
  for (int64_t t = first; t < last; ++t) {
    const scalar_t* q = qkv + t * 3 * experts;
    token_exponentials(q, experts, row_max.data(), e.data());
    weighted_values(e.data(), q + 2 * experts, experts, sum.data(), r + t * experts);
  }
}

/// One token's d q, d k and d v from g = d loss / d r, its exponentials e and their sums. With
/// p_ij = e[j][i] / sum_i and r_i = sum_j p_ij v_j:
///   d v_j = sum_i g_i p_ij,   d s_ij = g_i p_ij (v_j - r_i)   (the softmax backward),
///   d q_i = sum_j d s_ij k_j, d k_j = sum_i d s_ij q_i         (s_ij = q_i k_j).
/// scratch holds 2 E values.
template <typename scalar_t>
YUANMOE_AVX2_CLONE void token_gradients(const scalar_t* q, const scalar_t* g, const scalar_t* e, const scalar_t* sum,
                                        const scalar_t* r, int64_t experts, scalar_t* scratch, scalar_t* d_q) {
  const scalar_t *k = q + experts, *v = k + experts;
  scalar_t *d_k = d_q + experts, *d_v = d_k + experts;
  scalar_t *g_over_sum = scratch, *d_s = scratch + experts;
  for (int64_t i = 0; i < experts; ++i) g_over_sum[i] = g[i] / sum[i];
  std::fill(d_q, d_q + experts, scalar_t{0});
  for (int64_t j = 0; j < experts; ++j) {
    const scalar_t* e_j = e + j * experts;
    d_v[j] = lane_dot(g_over_sum, e_j, experts);
    for (int64_t i = 0; i < experts; ++i) {
      d_s[i] = g_over_sum[i] * e_j[i] * (v[j] - r[i]);
      d_q[i] += d_s[i] * k[j];
    }
    d_k[j] = lane_dot(d_s, q, experts);
  }
}

/// Writes d qkv for the tokens [first, last) from g_TE = d loss / d r.
template <typename scalar_t>
void backward_tokens(const scalar_t* qkv, const scalar_t* g_TE, int64_t experts, int64_t first, int64_t last,
                     scalar_t* d_qkv) {
  std::vector<scalar_t> e(experts * experts), row_max(experts), sum(experts), r(experts), scratch(2 * experts);
  for (int64_t t = first; t < last; ++t) {
    const scalar_t* q = qkv + t * 3 * experts;
    token_exponentials(q, experts, row_max.data(), e.data());
    weighted_values(e.data(), q + 2 * experts, experts, sum.data(), r.data());
    token_gradients(q, g_TE + t * experts, e.data(), sum.data(), r.data(), experts, scratch.data(),
                    d_qkv + t * 3 * experts);
  }
}

/// The attention router's per-token E x E attention on the CPU, one token at a time in the L1
/// cache: autograd's broadcast form passes about ten [T, E, E] temporaries through memory
/// (docs/routers.md, "Cost"). Nothing of size E x E is saved: the backward recomputes the
/// exponentials, which costs less than writing and reading them.
struct ExpertAttentionCpu : public torch::autograd::Function<ExpertAttentionCpu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv_T3E) {
    RECORD_FUNCTION("yuanmoe::expert_attention", std::vector<c10::IValue>{});
    const Tensor qkv = qkv_T3E.detach().contiguous();
    const int64_t tokens = qkv.size(0), experts = qkv.size(1) / 3;
    Tensor r_TE = torch::empty({tokens, experts}, qkv.options());
    AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "expert_attention_cpu", [&] {
      at::parallel_for(0, tokens, kRouterTokensPerTask, [&](int64_t first, int64_t last) {
        forward_tokens(qkv.const_data_ptr<scalar_t>(), experts, first, last, r_TE.data_ptr<scalar_t>());
      });
    });
    ctx->save_for_backward({qkv});
    return {r_TE};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor qkv = ctx->get_saved_variables()[0];
    const Tensor g_TE = grad_outputs[0].contiguous();
    const int64_t tokens = qkv.size(0), experts = qkv.size(1) / 3;
    Tensor d_qkv = torch::empty_like(qkv);
    AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "expert_attention_cpu_backward", [&] {
      at::parallel_for(0, tokens, kRouterTokensPerTask, [&](int64_t first, int64_t last) {
        backward_tokens(qkv.const_data_ptr<scalar_t>(), g_TE.const_data_ptr<scalar_t>(), experts, first, last,
                        d_qkv.data_ptr<scalar_t>());
      });
    });
    return {d_qkv};
  }
};

}  // namespace

Tensor expert_attention(const Tensor& qkv_T3E) {
  const int64_t experts = qkv_T3E.size(-1) / 3;
  const auto dtype = qkv_T3E.scalar_type();
  if (qkv_T3E.device().is_cpu() && (dtype == torch::kFloat || dtype == torch::kDouble)) {
    return ExpertAttentionCpu::apply(qkv_T3E)[0];
  }
  const std::vector<Tensor> qkv = qkv_T3E.split(experts, -1);
  const Tensor probs_TEE = torch::softmax(qkv[0].unsqueeze(2) * qkv[1].unsqueeze(1), -1);
  return (probs_TEE * qkv[2].unsqueeze(1)).sum(-1);
}

}  // namespace yuanmoe::model
