// Shape-letter legend used in tensor names across the code base (docs/architecture.md, "Shape letters"):
//   B batch, S sequence, T tokens (B*S flattened), D model dim (hidden_size),
//   H heads, Dh head dim, P attention width (H*Dh), F expert FFN width, E experts,
//   K routing slots per token, N routed (token, expert) pairs, M rows one rank's experts compute
//   (N after the expert-parallel dispatch), L MoE layers, V vocabulary. E1 is [E + 1]: a value
//   per expert, then a count.
// So x_BSD is [batch, seq, hidden] and gates_TK is [tokens, slots].
#pragma once
#include <torch/torch.h>

namespace yuanmoe {
using torch::Tensor;

/// fp32, or wider when the input is wider: numerically sensitive steps (norm statistics, softmax,
/// RoPE, routers) run in fp32 for bf16 models and stay exact for double-precision checks.
inline torch::Dtype at_least_fp32(const Tensor& t) {
  return torch::promote_types(t.scalar_type(), torch::kFloat);
}

/// in -> out, weight [out, in], no bias: every projection of the model (Yuan has no biases).
inline torch::nn::Linear linear_without_bias(int64_t in, int64_t out) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
}
}  // namespace yuanmoe
