// Localized Filtering-based Attention (Yuan 2.0, arXiv 2311.15786; yuan2-m32.md §3).
// Two causal 2-tap convolutions over the sequence, D -> D/2 -> D, plus an RMSNorm residual:
//   y1[t] = W1c a[t] + W1p a[t-1] + b1,   y2[t] = W2c y1[t] + W2p y1[t-1] + b2,
//   lfa[t] = RMSNorm(y2[t] + a[t]),       a[-1] = y1[-1] = 0.
// The weights keep the reference Conv2d shape [out, in, 2, 1] (tap 0 = previous token, because
// PyTorch convolution is cross-correlation) so they map one-to-one onto the HF names. Packed
// documents are filtered across their boundaries, as in the reference. Incremental decoding
// carries the previous frames in an LfaState (decode.h, yuan2-m32.md §10 option 2).
#pragma once

#include "yuanmoe/core/types.h"
#include "yuanmoe/model/norm.h"

namespace yuanmoe::model {

struct LfaState;  // decode.h

/// One causal 2-tap filter as a single GEMM: [x[t-1], x[t]] interleaved per channel matches the
/// memory order of weight [O, C, 2, 1] viewed as [O, 2C]. x_BSC -> y_BSO.
/// previous_B1C is x[-1], the frame before the chunk; undefined means a zero frame (sequence start).
Tensor causal_two_tap(const Tensor& x_BSC,
                      const Tensor& weight_OC21,
                      const Tensor& bias_O,
                      const Tensor& previous_B1C = {});

class LocalizedFilteringImpl : public torch::nn::Module {
 public:
  LocalizedFilteringImpl(int64_t hidden_size, double rms_norm_eps);
  /// a_BSD (the input-norm output) -> lfa_BSD. With a state, a_BSD continues the sequence the
  /// state has seen so far, and the state moves on to the end of this chunk.
  Tensor forward(const Tensor& a_BSD, LfaState* state = nullptr);

  torch::nn::Conv2d conv1{nullptr};  // [D/2, D, 2, 1] + bias; kernel (2,1), padding (1,0)
  torch::nn::Conv2d conv2{nullptr};  // [D, D/2, 2, 1] + bias
  RmsNorm output_layernorm{nullptr};
};
TORCH_MODULE(LocalizedFiltering);

}  // namespace yuanmoe::model
