// The experts of an MoE layer and the dense feed-forward of non-MoE layers: SwiGLU (Shazeer
// 2020, arXiv 2002.05202), u = W1 x (W1: [2F, D], gate rows first), h = silu(u[:F]) * u[F:],
// out = W2 h (W2: [D, F]). Not Yuan's dense YuanMLP, which puts the activation on the up
// projection. The experts run as two grouped GEMMs over rows grouped by expert: a per-expert
// loop with a hand-written backward, or at::_grouped_mm (moe.expert_gemm).
#pragma once

#include <vector>

#include "yuanmoe/config/config.h"
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

/// The rows a rank's experts compute, grouped by expert (what a token dispatcher hands them):
/// M rows, rows_per_expert[e] of them for local expert e, in expert order.
struct ExpertInput {
  Tensor xs_MD;
  std::vector<int64_t> rows_per_expert;  // [E_local] on the host, for the loop (empty when not read back)
  Tensor expert_offsets_E;               // int32 [E_local] on the device: each expert's end row (_grouped_mm)
};

/// All experts of one MoE layer (this rank's, under expert parallelism) as two grouped weights
/// (Megatron GroupedMLP layout); HF `experts.{e}.w1.weight` is `w1[e]`, `experts.{e}.w2.weight`
/// is `w2[e]`.
class GroupedExpertsImpl : public torch::nn::Module {
 public:
  GroupedExpertsImpl(int64_t num_experts, int64_t hidden_size, int64_t ffn_hidden_size,
                     config::ExpertGemm gemm = config::ExpertGemm::kAuto);
  /// The grouped rows -> their outputs [M, D], through the kernel uses_grouped_mm() picks.
  Tensor forward(const ExpertInput& input);
  /// Whether rows like xs run through at::_grouped_mm (moe.expert_gemm; auto: CUDA in bf16).
  bool uses_grouped_mm(const Tensor& xs) const;

  /// The two kernels, public so that `yuanmoe bench` can set them side by side.
  /// One contiguous GEMM pair per non-empty expert, sized by the host's row counts.
  Tensor forward_loop(const Tensor& xs_MD, const std::vector<int64_t>& rows_per_expert);
  /// at::_grouped_mm, the blocks given by their end rows on the device (int32): no host
  /// synchronisation. Autograd through libtorch's kernels.
  Tensor forward_grouped_mm(const Tensor& xs_MD, const Tensor& expert_offsets_E);

  Tensor w1;  // [E, 2F, D]
  Tensor w2;  // [E, D, F]

 private:
  config::ExpertGemm gemm_;
};
TORCH_MODULE(GroupedExperts);

}  // namespace yuanmoe::model
