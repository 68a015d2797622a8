#include "yuanmoe/model/lfa.h"

#include "yuanmoe/model/decode.h"

namespace yuanmoe::model {

namespace F = torch::nn::functional;

Tensor causal_two_tap(const Tensor& x_BSC,
                      const Tensor& weight_OC21,
                      const Tensor& bias_O,
                      const Tensor& previous_B1C) {
  const int64_t batch = x_BSC.size(0), seq = x_BSC.size(1), channels = x_BSC.size(2);
  const int64_t out_channels = weight_OC21.size(0);
  // x[t-1]: one frame in front of the sequence axis (zero at sequence start), drop the last.
  const Tensor previous_BSC =
      previous_B1C.defined()
          ? torch::cat({previous_B1C, x_BSC.narrow(1, 0, seq - 1)}, 1)
          : F::pad(x_BSC, F::PadFuncOptions({0, 0, 1, 0})).narrow(1, 0, seq);
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

Tensor LocalizedFilteringImpl::forward(const Tensor& a_BSD, LfaState* state) {
  const Tensor a_prev = state ? state->a_prev : Tensor();    // [B, 1, D] or undefined
  const Tensor y1_prev = state ? state->y1_prev : Tensor();  // [B, 1, D/2] or undefined
  const Tensor y1 = causal_two_tap(a_BSD, conv1->weight, conv1->bias, a_prev);  // [B, S, D/2]
  const Tensor y2 = causal_two_tap(y1, conv2->weight, conv2->bias, y1_prev);    // [B, S, D]
  if (state) {
    // The next chunk's t-1 frames (yuan2-m32.md §10, option 2): exact for chunks of any length.
    // Cloned so that the state holds one frame, not the whole chunk.
    const int64_t seq = a_BSD.size(1);
    state->a_prev = a_BSD.narrow(1, seq - 1, 1).clone();
    state->y1_prev = y1.narrow(1, seq - 1, 1).clone();
  }
  return output_layernorm(y2 + a_BSD);
}

}  // namespace yuanmoe::model
