#include "yuanmoe/model/transformer.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <torch/csrc/autograd/custom_function.h>

#include "yuanmoe/core/lane_sum.h"
#include "yuanmoe/model/attention_cpu.h"
#include "yuanmoe/model/decode.h"

namespace yuanmoe::model {

// ================================================================================================
// layout

Tensor document_causal_mask(const Tensor& document_ids_BS) {
  TORCH_CHECK(document_ids_BS.dim() == 2, "document ids: expected [B, S], got ", document_ids_BS.sizes());
  const int64_t seq = document_ids_BS.size(1);
  const Tensor same_BSS = document_ids_BS.unsqueeze(2) == document_ids_BS.unsqueeze(1);  // [b, i, j]
  const Tensor causal_SS =
      torch::ones({seq, seq}, torch::dtype(torch::kBool).device(document_ids_BS.device())).tril();
  return (same_BSS & causal_SS).unsqueeze(1);  // [B, 1, S, S]
}

// ================================================================================================
// norm

RmsNormImpl::RmsNormImpl(int64_t dim, double eps) : eps(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Rows per task of the CPU kernels below: fixed, so that the weight gradient's partial sums, and
/// with them its bits, do not depend on the thread count.
constexpr int64_t kNormRowsPerTask = 64;

/// RMSNorm on the CPU, one pass per row each way (sums in fp64): y = (x r) w with
/// r = 1 / sqrt(mean(x^2) + eps), dx = r (g w - x r mean(g w x r)), dw = sum over rows of g x r.
/// Autograd's version of the same formula runs a dozen operators each way, each a pass over the
/// activations: 25 ms of a tiny-m32 step against 4.7 (docs/benchmarks.md, "Profile of the step").
struct RmsNormCpu : public torch::autograd::Function<RmsNormCpu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_TD, const Tensor& weight_D, double eps) {
    const Tensor x = x_TD.detach().contiguous(), w = weight_D.detach().contiguous();
    const int64_t rows = x.size(0), dim = x.size(1);
    Tensor y = torch::empty_like(x), inv_rms = torch::empty({rows}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_cpu", [&] {
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      const scalar_t* ws = w.const_data_ptr<scalar_t>();
      scalar_t* ys = y.data_ptr<scalar_t>();
      scalar_t* rs = inv_rms.data_ptr<scalar_t>();
      at::parallel_for(0, rows, kNormRowsPerTask, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const scalar_t* row = xs + t * dim;
          const double squares = lane_sum(dim, [&](int64_t i) {
            const auto v = static_cast<double>(row[i]);
            return v * v;
          });
          const auto r = static_cast<scalar_t>(1.0 / std::sqrt(squares / static_cast<double>(dim) + eps));
          rs[t] = r;
          for (int64_t i = 0; i < dim; ++i) ys[t * dim + i] = row[i] * r * ws[i];
        }
      });
    });
    ctx->save_for_backward({x, w, inv_rms});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &inv_rms = saved[2];
    const Tensor g = grad_outputs[0].contiguous();
    const int64_t rows = x.size(0), dim = x.size(1);
    const int64_t tasks = (rows + kNormRowsPerTask - 1) / kNormRowsPerTask;
    Tensor d_x = torch::empty_like(x), d_w_partial = torch::empty({tasks, dim}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_cpu_backward", [&] {
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      const scalar_t* ws = w.const_data_ptr<scalar_t>();
      const scalar_t* rs = inv_rms.const_data_ptr<scalar_t>();
      const scalar_t* gs = g.const_data_ptr<scalar_t>();
      scalar_t* dxs = d_x.data_ptr<scalar_t>();
      scalar_t* partial = d_w_partial.data_ptr<scalar_t>();
      at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t last_task) {
        for (int64_t task = first_task; task < last_task; ++task) {
          scalar_t* d_w = partial + task * dim;
          std::fill(d_w, d_w + dim, scalar_t{0});
          const int64_t end = std::min(rows, (task + 1) * kNormRowsPerTask);
          for (int64_t t = task * kNormRowsPerTask; t < end; ++t) {
            const scalar_t *x_row = xs + t * dim, *g_row = gs + t * dim;
            const scalar_t r = rs[t];
            const double dot = lane_sum(dim, [&](int64_t i) {
              return static_cast<double>(g_row[i] * ws[i]) * static_cast<double>(x_row[i] * r);
            });
            const auto mean_dot = static_cast<scalar_t>(dot / static_cast<double>(dim));
            for (int64_t i = 0; i < dim; ++i) {
              const scalar_t normed = x_row[i] * r;
              dxs[t * dim + i] = r * (g_row[i] * ws[i] - normed * mean_dot);
              d_w[i] += g_row[i] * normed;
            }
          }
        }
      });
    });
    return {d_x, d_w_partial.sum(0), Tensor()};
  }
};

}  // namespace

Tensor RmsNormImpl::forward(const Tensor& x) {
  const Tensor x32 = x.to(at_least_fp32(x));
  const Tensor w = weight.to(x32.scalar_type());
  if (x32.device().is_cpu()) {
    const int64_t dim = x32.size(-1);
    return RmsNormCpu::apply(x32.reshape({-1, dim}), w, eps)[0].view(x32.sizes()).to(x.scalar_type());
  }
  const Tensor inv_rms = torch::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (x32 * inv_rms * w).to(x.scalar_type());
}

// ================================================================================================
// rope

namespace {

/// x rounded to the nearest bf16 value, kept in fp32.
Tensor round_to_bf16(const Tensor& x) { return x.to(torch::kBFloat16).to(torch::kFloat); }

}  // namespace

Tensor rope_inverse_frequencies(int64_t rotary_dim, double base, config::RopeTables tables) {
  // In double, then one rounding to fp32. Both references hold inv_freq in bf16: HF casts the
  // buffer, Megatron's Float16Module rounds it (max relative error 0.37%, docs/model.md §12.2).
  auto i = torch::arange(0, rotary_dim / 2, torch::kDouble);
  const Tensor inverse = torch::pow(base, -2.0 * i / static_cast<double>(rotary_dim)).to(torch::kFloat);
  return tables == config::RopeTables::kExact ? inverse : round_to_bf16(inverse);
}

RopeAngles rope_angles(const Tensor& inverse_frequencies, const Tensor& position_ids_BS, config::RopeTables tables) {
  // Integer positions are exact in fp32 up to 2^24.
  Tensor positions = position_ids_BS.to(torch::kFloat).unsqueeze(-1);  // [B, S, 1]
  const bool hf = tables == config::RopeTables::kHfBf16;
  if (hf) positions = round_to_bf16(positions);  // HF: arange(..., dtype=inv_freq.dtype)
  Tensor angles = (positions * inverse_frequencies.to(positions.device())).unsqueeze(2);  // [B, S, 1, r/2]
  if (!hf) return {torch::cos(angles), torch::sin(angles)};
  angles = round_to_bf16(angles);  // HF: the outer product and cos/sin are bf16 ops
  return {round_to_bf16(torch::cos(angles)), round_to_bf16(torch::sin(angles))};
}

namespace {

/// rotate_into on the CPU: one loop over the rows (b, s, h), in cache and over the intra-op
/// threads. ATen's strided multiplies run inner loops rotary_dim/2 long, one per row: 1.1 ms a
/// call for q and k of a tiny-m32 micro-batch.
template <typename scalar_t>
void rotate_into_cpu(Tensor& out, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t rotary_dim,
                     bool inverse) {
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), head_dim = x.size(3), half = rotary_dim / 2;
  const int64_t x_b = x.stride(0), x_s = x.stride(1), x_h = x.stride(2);
  const int64_t out_b = out.stride(0), out_s = out.stride(1), out_h = out.stride(2);
  const int64_t cos_b = cos.stride(0), cos_s = cos.stride(1), sin_b = sin.stride(0), sin_s = sin.stride(1);
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const scalar_t* cs = cos.const_data_ptr<scalar_t>();
  const scalar_t* ss = sin.const_data_ptr<scalar_t>();
  scalar_t* os = out.data_ptr<scalar_t>();
  at::parallel_for(0, batch * seq, 16, [&](int64_t first, int64_t last) {
    for (int64_t token = first; token < last; ++token) {
      const int64_t b = token / seq, s = token % seq;
      const scalar_t* c = cs + b * cos_b + s * cos_s;
      const scalar_t* n = ss + b * sin_b + s * sin_s;
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t* in = xs + b * x_b + s * x_s + h * x_h;
        scalar_t* o = os + b * out_b + s * out_s + h * out_h;
        if (inverse) {
          for (int64_t i = 0; i < half; ++i) {
            o[i] = in[i] * c[i] + in[i + half] * n[i];
            o[i + half] = in[i + half] * c[i] - in[i] * n[i];
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            o[i] = in[i] * c[i] - in[i + half] * n[i];
            o[i + half] = in[i + half] * c[i] + in[i] * n[i];
          }
        }
        std::copy(in + rotary_dim, in + head_dim, o + rotary_dim);
      }
    }
  });
}

/// out = [x1 cos - x2 sin | x2 cos + x1 sin | x3] with x = [x1 | x2 | x3], x1 and x2 rotary_dim/2
/// wide; `inverse` rotates the other way (the backward). Written into `out`, no temporaries.
void rotate_into(Tensor out, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t rotary_dim,
                 bool inverse) {
  const auto unit_stride = [](const Tensor& t) { return t.dim() == 4 && t.stride(3) == 1; };
  if (x.is_cpu() && unit_stride(x) && unit_stride(out) && unit_stride(cos) && unit_stride(sin) &&
      cos.size(2) == 1 && sin.size(2) == 1) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotate_into_cpu",
                               [&] { rotate_into_cpu<scalar_t>(out, x, cos, sin, rotary_dim, inverse); });
    return;
  }
  const double sign = inverse ? -1.0 : 1.0;
  const int64_t half = rotary_dim / 2, head_dim = x.size(-1);
  const Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  Tensor out1 = out.narrow(-1, 0, half), out2 = out.narrow(-1, half, half);
  at::mul_out(out1, x1, cos).addcmul_(x2, sin, -sign);
  at::mul_out(out2, x2, cos).addcmul_(x1, sin, sign);
  if (rotary_dim < head_dim) {
    const int64_t rest = head_dim - rotary_dim;
    out.narrow(-1, rotary_dim, rest).copy_(x.narrow(-1, rotary_dim, rest));
  }
}

/// RoPE over the `parts` heads-dims-wide slices of x_BSHn (q and k of Yuan's per-head [q | k]
/// layout), each returned as its own tensor: autograd's narrow, mul, cat and their backwards
/// would zero-fill and copy the whole input once per slice. The backward rotates the gradient
/// back into one buffer. Computed in fp32 at least; outputs and gradient in the input's dtype.
struct RotaryEmbedding : public torch::autograd::Function<RotaryEmbedding> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_BSHn, const Tensor& cos, const Tensor& sin,
                               int64_t rotary_dim, int64_t parts) {
    const int64_t head_dim = x_BSHn.size(-1) / parts;
    const Tensor x = x_BSHn.detach().to(at_least_fp32(x_BSHn));
    const Tensor cos_x = cos.to(x.scalar_type()), sin_x = sin.to(x.scalar_type());
    variable_list outputs;
    for (int64_t p = 0; p < parts; ++p) {
      const Tensor x_p = x.narrow(-1, p * head_dim, head_dim);
      Tensor out = torch::empty(x_p.sizes(), x.options());
      rotate_into(out, x_p, cos_x, sin_x, rotary_dim, /*inverse=*/false);
      outputs.push_back(out.to(x_BSHn.scalar_type()));
    }
    ctx->save_for_backward({cos_x, sin_x});
    ctx->saved_data["rotary_dim"] = rotary_dim;
    ctx->saved_data["dtype"] = x_BSHn.scalar_type();
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t rotary_dim = ctx->saved_data["rotary_dim"].toInt();
    const int64_t parts = static_cast<int64_t>(grad_outputs.size());
    const Tensor& cos = saved[0];
    const Tensor& sin = saved[1];
    std::vector<int64_t> sizes;
    for (const auto& g : grad_outputs) {
      if (g.defined()) sizes = g.sizes().vec();
    }
    const int64_t head_dim = sizes.back();
    sizes.back() = parts * head_dim;
    Tensor d_x = torch::empty(sizes, cos.options());
    for (int64_t p = 0; p < parts; ++p) {
      Tensor d_x_p = d_x.narrow(-1, p * head_dim, head_dim);
      if (grad_outputs[p].defined()) {
        rotate_into(d_x_p, grad_outputs[p].to(cos.scalar_type()), cos, sin, rotary_dim, /*inverse=*/true);
      } else {
        d_x_p.zero_();
      }
    }
    return {d_x.to(ctx->saved_data["dtype"].toScalarType()), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

std::vector<Tensor> apply_rope_to_parts(const Tensor& x_BSHn, const RopeAngles& angles, int64_t rotary_dim,
                                        int64_t parts) {
  TORCH_CHECK(x_BSHn.size(-1) % parts == 0, "apply_rope: last dim ", x_BSHn.size(-1), " is not ", parts, " parts");
  if (rotary_dim == 0) return x_BSHn.chunk(parts, -1);
  return RotaryEmbedding::apply(x_BSHn, angles.cos, angles.sin, rotary_dim, parts);
}

Tensor apply_rope(const Tensor& x_BSHDh, const RopeAngles& angles, int64_t rotary_dim) {
  return apply_rope_to_parts(x_BSHDh, angles, rotary_dim, 1)[0];
}

double ntk_scaled_rope_base(double base, double scale, int64_t rotary_dim) {
  const double d = static_cast<double>(rotary_dim);
  return base * std::pow(scale, d / (d - 2.0));
}

// ================================================================================================
// lfa

namespace F = torch::nn::functional;

Tensor causal_two_tap(const Tensor& x_BSC,
                      const Tensor& weight_OC21,
                      const Tensor& bias_O,
                      const Tensor& previous_B1C,
                      const Tensor& document_ids_BS) {
  const int64_t batch = x_BSC.size(0), seq = x_BSC.size(1), channels = x_BSC.size(2);
  const int64_t out_channels = weight_OC21.size(0);
  // x[t-1]: one frame in front of the sequence axis (zero at sequence start), drop the last.
  Tensor previous_BSC =
      previous_B1C.defined()
          ? torch::cat({previous_B1C, x_BSC.narrow(1, 0, seq - 1)}, 1)
          : F::pad(x_BSC, F::PadFuncOptions({0, 0, 1, 0})).narrow(1, 0, seq);
  if (document_ids_BS.defined()) {
    TORCH_CHECK(!previous_B1C.defined(), "causal_two_tap: document ids are for whole packed samples, not chunks");
    TORCH_CHECK(document_ids_BS.dim() == 2 && document_ids_BS.size(0) == batch && document_ids_BS.size(1) == seq,
                "causal_two_tap: document ids ", document_ids_BS.sizes(), " do not match the input's [B, S] = [",
                batch, ", ", seq, "]");
    // A document's first token reads the zero frame, as the sequence's first token does.
    const Tensor starts_BS1 =
        (document_ids_BS.narrow(1, 1, seq - 1) != document_ids_BS.narrow(1, 0, seq - 1)).unsqueeze(-1);
    previous_BSC = torch::cat({previous_BSC.narrow(1, 0, 1),
                               previous_BSC.narrow(1, 1, seq - 1).masked_fill(starts_BS1, 0)},
                              1);  // [B, S, C]
  }
  const Tensor taps_TC2 = torch::stack({previous_BSC, x_BSC}, -1).reshape({batch * seq, 2 * channels});
  const Tensor y_TO =
      torch::addmm(bias_O, taps_TC2, weight_OC21.reshape({out_channels, 2 * channels}).t());
  return y_TO.view({batch, seq, out_channels});
}

LocalizedFilteringImpl::LocalizedFilteringImpl(int64_t hidden_size, double rms_norm_eps) {
  const auto conv = [](int64_t in, int64_t out) {
    return torch::nn::Conv2dOptions(in, out, {2, 1}).stride(1).padding({1, 0}).bias(true);
  };
  conv1 = register_module("conv1", torch::nn::Conv2d(conv(hidden_size, hidden_size / 2)));
  conv2 = register_module("conv2", torch::nn::Conv2d(conv(hidden_size / 2, hidden_size)));
  output_layernorm = register_module("output_layernorm", RmsNorm(hidden_size, rms_norm_eps));
}

Tensor LocalizedFilteringImpl::forward(const Tensor& a_BSD, LfaState* state, const Tensor& document_ids_BS) {
  TORCH_CHECK(!(state && document_ids_BS.defined()),
              "LocalizedFiltering: document ids are for whole packed samples; decoding keeps plain positions");
  const Tensor a_prev = state ? state->a_prev : Tensor();    // [B, 1, D] or undefined
  const Tensor y1_prev = state ? state->y1_prev : Tensor();  // [B, 1, D/2] or undefined
  const Tensor y1 = causal_two_tap(a_BSD, conv1->weight, conv1->bias, a_prev, document_ids_BS);  // [B, S, D/2]
  const Tensor y2 = causal_two_tap(y1, conv2->weight, conv2->bias, y1_prev, document_ids_BS);    // [B, S, D]
  if (state) {
    // The next chunk's t-1 frames (docs/architecture.md, "Incremental decoding"): exact for chunks of any length.
    // Cloned so that the state holds one frame, not the whole chunk.
    const int64_t seq = a_BSD.size(1);
    state->a_prev = a_BSD.narrow(1, seq - 1, 1).clone();
    state->y1_prev = y1.narrow(1, seq - 1, 1).clone();
  }
  return output_layernorm(y2 + a_BSD);
}

// ================================================================================================
// attention

namespace F = torch::nn::functional;

Tensor causal_attention(const Tensor& q_BHSDh,
                        const Tensor& k_BHSDh,
                        const Tensor& v_BHSDh,
                        double dropout_p,
                        int64_t offset,
                        const Tensor& document_ids_BS) {
  const int64_t seq_q = q_BHSDh.size(2), seq_k = k_BHSDh.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q_BHSDh.size(-1)));
  Tensor scores_BHSS = torch::matmul(q_BHSDh, k_BHSDh.transpose(-2, -1));  // [B, H, Sq, Sk]
  scores_BHSS = scores_BHSS.to(at_least_fp32(scores_BHSS)) * scale;
  if (document_ids_BS.defined()) {
    TORCH_CHECK(offset == 0 && seq_q == seq_k, "causal_attention: document ids are for whole sequences");
    // Key j is hidden from query i when it is in i's future or in another document.
    scores_BHSS.masked_fill_(document_causal_mask(document_ids_BS).logical_not(),
                             -std::numeric_limits<float>::infinity());
  } else {
    // Key j is in the future of query i when j > offset + i.
    const Tensor future_SS =
        torch::ones({seq_q, seq_k}, torch::dtype(torch::kBool).device(q_BHSDh.device()))
            .triu(1 + offset);
    scores_BHSS.masked_fill_(future_SS, -std::numeric_limits<float>::infinity());
  }
  Tensor probs_BHSS = torch::softmax(scores_BHSS, -1);
  if (dropout_p > 0) probs_BHSS = F::dropout(probs_BHSS, F::DropoutFuncOptions().p(dropout_p));
  return torch::matmul(probs_BHSS.to(v_BHSDh.scalar_type()), v_BHSDh);
}

Tensor sdpa_causal_attention(const Tensor& q_BHSDh,
                             const Tensor& k_BHSDh,
                             const Tensor& v_BHSDh,
                             const Tensor& document_ids_BS) {
  TORCH_CHECK(q_BHSDh.size(2) == k_BHSDh.size(2), "sdpa_causal_attention: whole sequences only");
  if (document_ids_BS.defined()) {
    // An explicit block-diagonal causal mask instead of is_causal: the kernels that take a mask
    // (CPU flash, CUDA memory-efficient or the math fallback) run it.
    return at::scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, document_causal_mask(document_ids_BS),
                                            /*dropout_p=*/0.0, /*is_causal=*/false);
  }
  return at::scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/true);
}

Tensor attention_core(config::AttentionKernel kernel,
                      const Tensor& q_BHSDh,
                      const Tensor& k_BHSDh,
                      const Tensor& v_BHSDh,
                      double dropout_p,
                      int64_t offset,
                      const Tensor& document_ids_BS) {
  // A fused kernel for whole sequences: faster than materialised scores at every length measured,
  // and memory linear in S (docs/benchmarks.md). Dropout needs the probabilities and a chunk after
  // cached keys needs the offset mask: those materialise (docs/config.md).
  if (kernel == config::AttentionKernel::kSdpa && dropout_p == 0 && offset == 0) {
    // On the CPU our kernel (attention_cpu.h) where it applies: faster than libtorch's CPU flash
    // kernel at tiny-m32's shape (docs/benchmarks.md, "Attention on the CPU").
    const Tensor q_BSHDh = q_BHSDh.transpose(1, 2), k_BSHDh = k_BHSDh.transpose(1, 2),
                 v_BSHDh = v_BHSDh.transpose(1, 2);
    if (causal_attention_cpu_applies(q_BSHDh, k_BSHDh, v_BSHDh, document_ids_BS)) {
      return causal_attention_cpu(q_BSHDh, k_BSHDh, v_BSHDh, document_ids_BS).transpose(1, 2);
    }
    return sdpa_causal_attention(q_BHSDh, k_BHSDh, v_BHSDh, document_ids_BS);
  }
  return causal_attention(q_BHSDh, k_BHSDh, v_BHSDh, dropout_p, offset, document_ids_BS);
}

AttentionImpl::AttentionImpl(const config::ModelConfig& config) : config(config) {
  const int64_t width = config.attention_width();
  // Registration order follows the HF state dict (v, q, k, o, lf_gate).
  v_proj = register_module("v_proj", linear_without_bias(config.hidden_size, width));
  q_proj = register_module("q_proj", linear_without_bias(config.hidden_size, width));
  k_proj = register_module("k_proj", linear_without_bias(config.hidden_size, width));
  o_proj = register_module("o_proj", linear_without_bias(width, config.hidden_size));
  if (config.lfa) {
    lf_gate = register_module("lf_gate",
                              LocalizedFiltering(config.hidden_size, config.rms_norm_eps));
  }
  inverse_frequencies_ = rope_inverse_frequencies(config.rotary_dim, config.rope_base, config.rope_tables);
}

const Tensor& AttentionImpl::inverse_frequencies_on(const torch::Device& device) {
  if (!device_inverse_frequencies_.defined() || device_inverse_frequencies_.device() != device) {
    // Asynchronous: from pageable memory CUDA stages the bytes before the call returns.
    device_inverse_frequencies_ = inverse_frequencies_.to(device, /*non_blocking=*/true);
  }
  return device_inverse_frequencies_;
}

Tensor AttentionImpl::forward(const Tensor& a_BSD,
                              const TokenLayout& tokens,
                              LayerCache* cache) {
  const int64_t batch = a_BSD.size(0), seq = a_BSD.size(1);
  const int64_t heads = config.num_attention_heads, head_dim = config.head_dim;
  const Tensor& document_ids_BS = tokens.document_ids_BS;  // undefined: plain causal
  TORCH_CHECK(!(cache && document_ids_BS.defined()),
              "Attention: document ids are for whole packed samples; decoding keeps plain positions");

  const Tensor v_BSHDh = v_proj(a_BSD).view({batch, seq, heads, head_dim});
  const Tensor qk_input_BSD =
      config.lfa ? lf_gate(a_BSD, cache ? &cache->lfa : nullptr, document_ids_BS) : a_BSD;
  // [q_proj | k_proj] as one GEMM (the [2P, D] weight is a small copy; no cat of the outputs),
  // [B, S, 2P] viewed per head as [q(Dh) | k(Dh)] (docs/model.md §4.1).
  const Tensor qk_weight = torch::cat({q_proj->weight, k_proj->weight});
  const Tensor qk_BSH2 = torch::matmul(qk_input_BSD, qk_weight.t())
                             .view({batch, seq, heads, 2 * head_dim});
  const RopeAngles angles =
      rope_angles(inverse_frequencies_on(a_BSD.device()), tokens.position_ids_BS, config.rope_tables);
  const std::vector<Tensor> qk_rotated = apply_rope_to_parts(qk_BSH2, angles, config.rotary_dim, 2);
  const Tensor &q_BSHDh = qk_rotated[0], &k_BSHDh = qk_rotated[1];

  Tensor k_BHTDh = k_BSHDh.transpose(1, 2), v_BHTDh = v_BSHDh.transpose(1, 2);
  int64_t offset = 0;  // tokens before this chunk
  if (cache) {
    // K is cached after RoPE (docs/architecture.md, "Incremental decoding"), so cached keys keep their own positions.
    if (cache->k_BHTDh.defined()) {
      offset = cache->k_BHTDh.size(2);
      k_BHTDh = torch::cat({cache->k_BHTDh, k_BHTDh}, 2);
      v_BHTDh = torch::cat({cache->v_BHTDh, v_BHTDh}, 2);
    }
    cache->k_BHTDh = k_BHTDh;
    cache->v_BHTDh = v_BHTDh;
  }

  const double dropout_p = is_training() ? config.attention_dropout : 0.0;
  const Tensor out_BHSDh =
      attention_core(config.attention, q_BSHDh.transpose(1, 2), k_BHTDh, v_BHTDh, dropout_p, offset, document_ids_BS);
  return o_proj(out_BHSDh.transpose(1, 2).reshape({batch, seq, heads * head_dim}));
}

// ================================================================================================
// block

bool is_moe_layer(const config::MoeConfig& moe, int64_t layer_index) {
  return layer_index % moe.moe_layer_freq == 0;
}

int64_t count_moe_layers(const config::MoeConfig& moe, int64_t first, int64_t end) {
  int64_t count = 0;
  for (int64_t l = first; l < end; ++l) count += is_moe_layer(moe, l) ? 1 : 0;
  return count;
}

TransformerBlockImpl::TransformerBlockImpl(const config::ModelConfig& model,
                                           const config::MoeConfig& moe,
                                           int64_t layer_index)
    : layer_index(layer_index) {
  input_layernorm = register_module("input_layernorm", RmsNorm(model.hidden_size, model.rms_norm_eps));
  self_attn = register_module("self_attn", Attention(model));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RmsNorm(model.hidden_size, model.rms_norm_eps));
  if (is_moe_layer(moe, layer_index)) {
    this->moe = register_module("mlp", Moe(moe, model.hidden_size));
  } else {
    dense_mlp = register_module("mlp", DenseMlp(model.hidden_size, moe.dense_layer_ffn_size()));
  }
}

BlockOutput TransformerBlockImpl::forward(const Tensor& x_BSD,
                                          const TokenLayout& tokens,
                                          LayerCache* cache) {
  Tensor x = x_BSD + self_attn(input_layernorm(x_BSD), tokens, cache);
  const Tensor m = post_attention_layernorm(x);
  if (moe) {
    MoeOutput out = moe(m);
    return {x + out.out, out.aux_loss, out.routed_pairs_E};
  }
  return {x + dense_mlp(m), Tensor(), Tensor()};
}

// ================================================================================================
// transformer

Tensor TransformerBlockImpl::rerun_record() const { return moe ? moe->gate->rerun_record() : Tensor(); }

void TransformerBlockImpl::rerun_next_forward(const Tensor& record) {
  if (moe) moe->gate->rerun_next_forward(record);
}

TransformerImpl::TransformerImpl(const config::ModelConfig& model,
                                 const config::MoeConfig& moe,
                                 StageSpec stage)
    : config(model), stage(stage) {
  if (stage.holds_embedding(model.tie_embeddings)) {
    embed_tokens = register_module("embed_tokens",
                                   torch::nn::Embedding(model.vocab_size, model.hidden_size));
  }
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> named_blocks;
  for (int64_t l = stage.first_layer; l < stage.end_layer; ++l) {
    blocks.push_back(TransformerBlock(model, moe, l));
    named_blocks.emplace_back(std::to_string(l), blocks.back().ptr());
  }
  layers = register_module("layers", torch::nn::ModuleDict(named_blocks));
  if (stage.has_head) {
    norm = register_module("norm", RmsNorm(model.hidden_size, model.rms_norm_eps));
    if (!model.tie_embeddings) {
      lm_head = register_module("lm_head", linear_without_bias(model.hidden_size, model.vocab_size));
    }
  }
}

ModelOutput TransformerImpl::forward(const Tensor& input,
                                     const TokenLayout& tokens,
                                     DecodeCache* cache) {
  if (cache) {
    TORCH_CHECK(cache->layers.size() == blocks.size(), "DecodeCache has ", cache->layers.size(),
                " layers, this model (stage) has ", blocks.size(),
                "; build the cache from this model: DecodeCache(model)");
    TORCH_CHECK(!tokens.document_ids_BS.defined(),
                "Transformer: decoding with a cache keeps plain positions; pass no document ids");
  }
  if (tokens.document_ids_BS.defined()) {
    TORCH_CHECK(tokens.document_ids_BS.dim() == 2 && tokens.document_ids_BS.size(0) == input.size(0) &&
                    tokens.document_ids_BS.size(1) == input.size(1),
                "Transformer: document ids ", tokens.document_ids_BS.sizes(), " do not match the input ",
                input.sizes());
  }
  Tensor x = stage.has_embedding ? embed_tokens(input) : input;  // [B, S, D]
  Tensor aux_loss;
  std::vector<Tensor> expert_load;
  const bool wrapped = block_wrapper && is_training() && torch::GradMode::is_enabled() && cache == nullptr;
  for (size_t l = 0; l < blocks.size(); ++l) {
    BlockOutput out = wrapped ? block_wrapper(*blocks[l], x, tokens)
                              : blocks[l](x, tokens, cache ? &cache->layers[l] : nullptr);
    x = out.x;
    if (out.aux_loss.defined()) aux_loss = aux_loss.defined() ? aux_loss + out.aux_loss : out.aux_loss;
    if (out.routed_pairs_E.defined()) expert_load.push_back(out.routed_pairs_E);
  }
  if (cache) cache->num_tokens += x.size(1);
  const Tensor routed_pairs_LE = expert_load.empty() ? Tensor() : torch::stack(expert_load);
  if (!stage.has_head) return {x, aux_loss, routed_pairs_LE};
  const Tensor h = norm(x);
  const Tensor& head_weight = config.tie_embeddings ? embed_tokens->weight : lm_head->weight;
  return {torch::matmul(h, head_weight.t()), aux_loss, routed_pairs_LE};  // [B, S, V]
}

std::vector<Moe> TransformerImpl::moe_layers() const {
  std::vector<Moe> out;
  for (const auto& block : blocks) {
    if (block->moe) out.push_back(block->moe);
  }
  return out;
}

Tensor default_position_ids(int64_t batch, int64_t seq, torch::Device device) {
  return torch::arange(seq, torch::dtype(torch::kLong).device(device)).unsqueeze(0).expand({batch, seq});
}

StageSpec balanced_stage(int64_t num_layers, int64_t stages, int64_t stage, int64_t first_layers,
                         int64_t last_layers) {
  std::vector<int64_t> sizes(static_cast<size_t>(stages), 0);
  if (stages > 1 && first_layers > 0) sizes.front() = first_layers;
  if (stages > 1 && last_layers > 0) sizes.back() = last_layers;
  std::vector<size_t> free_stages;
  for (size_t s = 0; s < sizes.size(); ++s) {
    if (sizes[s] == 0) free_stages.push_back(s);
  }
  int64_t rest = num_layers;
  for (const int64_t size : sizes) rest -= size;
  const int64_t n = static_cast<int64_t>(free_stages.size());
  for (int64_t i = 0; i < n; ++i) sizes[free_stages[static_cast<size_t>(i)]] = rest / n + (i < rest % n ? 1 : 0);
  int64_t first = 0;
  for (int64_t s = 0; s < stage; ++s) first += sizes[static_cast<size_t>(s)];
  return {first, first + sizes[static_cast<size_t>(stage)], stage == 0, stage == stages - 1};
}

}  // namespace yuanmoe::model
