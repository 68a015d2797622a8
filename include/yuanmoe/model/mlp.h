// SwiGLU feed-forward math shared by the experts and the dense layers (yuan2-m32.md §6):
//   u = W1 x (W1: [2F, D], gate rows first), h = silu(u[:F]) * u[F:], out = W2 h (W2: [D, F]).
// Not Yuan's dense YuanMLP, which puts the activation on the up projection.
#pragma once

#include <vector>

#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// x_TD, w1_2FD, w2_DF -> out_TD.
Tensor swiglu(const Tensor& x_TD, const Tensor& w1_2FD, const Tensor& w2_DF);

/// A dense SwiGLU layer (layers that moe.moe_layer_freq leaves dense).
class DenseMlpImpl : public torch::nn::Module {
 public:
  DenseMlpImpl(int64_t hidden_size, int64_t ffn_hidden_size);
  Tensor forward(const Tensor& x);  // [..., D] -> [..., D]

  torch::nn::Linear w1{nullptr};  // D -> 2F
  torch::nn::Linear w2{nullptr};  // F -> D
};
TORCH_MODULE(DenseMlp);

/// All experts of one MoE layer as two grouped weights (Megatron GroupedMLP layout);
/// HF `experts.{e}.w1.weight` is `w1[e]`, `experts.{e}.w2.weight` is `w2[e]`.
class GroupedExpertsImpl : public torch::nn::Module {
 public:
  GroupedExpertsImpl(int64_t num_experts, int64_t hidden_size, int64_t ffn_hidden_size);
  /// xs_ND: routed rows sorted by expert, rows_per_expert[e] of them for expert e in order.
  /// One contiguous GEMM pair per non-empty expert. Returns ys_ND.
  Tensor forward(const Tensor& xs_ND, const std::vector<int64_t>& rows_per_expert);

  Tensor w1;  // [E, 2F, D]
  Tensor w2;  // [E, D, F]
};
TORCH_MODULE(GroupedExperts);

}  // namespace yuanmoe::model
