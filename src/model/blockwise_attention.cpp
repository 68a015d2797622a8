#include "yuanmoe/model/blockwise_attention.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>

namespace yuanmoe::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();

/// The block math is fp32 whatever autocast would choose: the online softmax's running sums
/// lose too much in bf16, and the caller's dtypes are restored on the way out.
class AutocastSuspended {
 public:
  AutocastSuspended() : cpu_(at::autocast::is_autocast_enabled(at::kCPU)), cuda_(at::autocast::is_autocast_enabled(at::kCUDA)) {
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::set_autocast_enabled(at::kCUDA, false);
  }
  ~AutocastSuspended() {
    at::autocast::set_autocast_enabled(at::kCPU, cpu_);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda_);
  }
  AutocastSuspended(const AutocastSuspended&) = delete;
  AutocastSuspended& operator=(const AutocastSuspended&) = delete;

 private:
  bool cpu_, cuda_;
};

struct Span {
  int64_t start, size;
};

std::vector<Span> spans(int64_t length, int64_t block) {
  std::vector<Span> out;
  for (int64_t start = 0; start < length; start += block) out.push_back({start, std::min(block, length - start)});
  return out;
}

enum class Visibility { kNone, kPartial, kAll };

/// Which keys of `keys` the queries of `queries` see: query i (key position offset + i) sees key j
/// iff j <= offset + i.
Visibility visibility(Span queries, Span keys, int64_t offset) {
  if (keys.start > offset + queries.start + queries.size - 1) return Visibility::kNone;
  if (keys.start + keys.size - 1 <= offset + queries.start) return Visibility::kAll;
  return Visibility::kPartial;
}

/// [nq, nk] bool, true where the key lies in the query's future.
Tensor future_mask(Span queries, Span keys, int64_t offset, torch::Device device) {
  const auto options = torch::dtype(torch::kLong).device(device);
  const Tensor key_pos = torch::arange(keys.start, keys.start + keys.size, options);
  const Tensor query_pos = torch::arange(offset + queries.start, offset + queries.start + queries.size, options);
  return key_pos.unsqueeze(0) > query_pos.unsqueeze(1);
}

/// Scaled scores of one (query block, key block) pair with the future masked to -inf.
/// [B, H, nq, nk]
Tensor block_scores(const Tensor& q_blk, const Tensor& k_blk, Span queries, Span keys, int64_t offset,
                    double scale) {
  Tensor s = torch::matmul(q_blk, k_blk.transpose(-2, -1)).mul_(scale);
  if (visibility(queries, keys, offset) == Visibility::kPartial) {
    s.masked_fill_(future_mask(queries, keys, offset, s.device()), kMinusInfinity);
  }
  return s;
}

struct BlockwiseAttention : public torch::autograd::Function<BlockwiseAttention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                               int64_t block, int64_t offset) {
    AutocastSuspended no_autocast;
    const auto dtype = at_least_fp32(q_in);
    const Tensor q = q_in.to(dtype), k = k_in.to(dtype), v = v_in.to(dtype);
    const int64_t batch = q.size(0), heads = q.size(1), seq_q = q.size(2), dim_v = v.size(3);
    const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));

    Tensor out_BHSDv = torch::empty({batch, heads, seq_q, dim_v}, q.options());
    Tensor lse_BHS = torch::empty({batch, heads, seq_q}, q.options());
    for (const Span queries : spans(seq_q, block)) {
      const Tensor q_blk = q.narrow(2, queries.start, queries.size);
      Tensor running_max = torch::full({batch, heads, queries.size}, kMinusInfinity, q.options());  // m
      Tensor denominator = torch::zeros({batch, heads, queries.size}, q.options());                 // l
      Tensor accumulator = torch::zeros({batch, heads, queries.size, dim_v}, q.options());
      // Key block 0 holds key 0, which every query sees, so m is finite after the first block and a
      // later block that is wholly masked for some query contributes exp(-inf) = 0, never NaN.
      for (const Span keys : spans(k.size(2), block)) {
        if (visibility(queries, keys, offset) == Visibility::kNone) break;  // later blocks too
        Tensor p = block_scores(q_blk, k.narrow(2, keys.start, keys.size), queries, keys, offset, scale);
        const Tensor new_max = torch::maximum(running_max, std::get<0>(p.max(-1)));
        p.sub_(new_max.unsqueeze(-1)).exp_();
        const Tensor correction = (running_max - new_max).exp_();
        denominator.mul_(correction).add_(p.sum(-1));
        accumulator.mul_(correction.unsqueeze(-1)).add_(torch::matmul(p, v.narrow(2, keys.start, keys.size)));
        running_max = new_max;
      }
      out_BHSDv.narrow(2, queries.start, queries.size).copy_(accumulator.div_(denominator.unsqueeze(-1)));
      lse_BHS.narrow(2, queries.start, queries.size).copy_(running_max.add_(denominator.log_()));
    }
    ctx->saved_data["block"] = block;
    ctx->saved_data["offset"] = offset;
    ctx->save_for_backward({q_in, k_in, v_in, out_BHSDv, lse_BHS});
    return {out_BHSDv.to(v_in.scalar_type())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    AutocastSuspended no_autocast;
    const variable_list saved = ctx->get_saved_variables();
    const int64_t block = ctx->saved_data["block"].toInt(), offset = ctx->saved_data["offset"].toInt();
    const Tensor &out = saved[3], &lse_BHS = saved[4];
    const auto dtype = out.scalar_type();
    const Tensor q = saved[0].to(dtype), k = saved[1].to(dtype), v = saved[2].to(dtype);
    const Tensor d_out = grad_outputs[0].to(dtype);
    const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));

    // D_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term (FA-2 eq. after Alg. 2).
    const Tensor row_term_BHS = (d_out * out).sum(-1);
    Tensor dq = torch::zeros_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
    const std::vector<Span> query_blocks = spans(q.size(2), block);
    // Key blocks outside, query blocks inside: dK and dV of a key block finish in one pass.
    for (const Span keys : spans(k.size(2), block)) {
      const Tensor k_blk = k.narrow(2, keys.start, keys.size), v_blk = v.narrow(2, keys.start, keys.size);
      Tensor dk_blk = dk.narrow(2, keys.start, keys.size), dv_blk = dv.narrow(2, keys.start, keys.size);
      for (const Span queries : query_blocks) {
        if (visibility(queries, keys, offset) == Visibility::kNone) continue;
        const Tensor q_blk = q.narrow(2, queries.start, queries.size);
        const Tensor d_out_blk = d_out.narrow(2, queries.start, queries.size);
        Tensor p = block_scores(q_blk, k_blk, queries, keys, offset, scale);
        p.sub_(lse_BHS.narrow(2, queries.start, queries.size).unsqueeze(-1)).exp_();  // P = exp(S - L)
        dv_blk.add_(torch::matmul(p.transpose(-2, -1), d_out_blk));
        Tensor d_scores = torch::matmul(d_out_blk, v_blk.transpose(-2, -1));  // dP
        d_scores.sub_(row_term_BHS.narrow(2, queries.start, queries.size).unsqueeze(-1)).mul_(p);  // dS
        dq.narrow(2, queries.start, queries.size).add_(torch::matmul(d_scores, k_blk), scale);
        dk_blk.add_(torch::matmul(d_scores.transpose(-2, -1), q_blk), scale);
      }
    }
    return {dq.to(saved[0].scalar_type()), dk.to(saved[1].scalar_type()), dv.to(saved[2].scalar_type()),
            Tensor(), Tensor()};
  }
};

}  // namespace

Tensor blockwise_causal_attention(const Tensor& q_BHSDh,
                                  const Tensor& k_BHSDh,
                                  const Tensor& v_BHSDh,
                                  int64_t block_size,
                                  int64_t offset) {
  TORCH_CHECK(block_size > 0, "blockwise_causal_attention: block_size must be > 0, got ", block_size);
  TORCH_CHECK(offset >= 0 && k_BHSDh.size(2) >= offset + q_BHSDh.size(2),
              "blockwise_causal_attention: ", k_BHSDh.size(2), " keys cannot hold ", q_BHSDh.size(2),
              " queries after offset ", offset);
  return BlockwiseAttention::apply(q_BHSDh, k_BHSDh, v_BHSDh, block_size, offset)[0];
}

}  // namespace yuanmoe::model
