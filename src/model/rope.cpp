#include "yuanmoe/model/rope.h"

#include <cmath>

namespace yuanmoe::model {

Tensor rope_inverse_frequencies(int64_t rotary_dim, double base) {
  // In double, then one rounding to fp32 (Megatron keeps fp32 inv_freq; HF rounds to bf16).
  auto i = torch::arange(0, rotary_dim / 2, torch::kDouble);
  return torch::pow(base, -2.0 * i / static_cast<double>(rotary_dim)).to(torch::kFloat);
}

RopeAngles rope_angles(const Tensor& inverse_frequencies, const Tensor& position_ids_BS) {
  // Integer positions are exact in fp32 up to 2^24.
  const Tensor positions = position_ids_BS.to(torch::kFloat).unsqueeze(-1);  // [B, S, 1]
  const Tensor angles = (positions * inverse_frequencies.to(positions.device())).unsqueeze(2);
  return {torch::cos(angles), torch::sin(angles)};  // [B, S, 1, r/2]
}

Tensor apply_rope(const Tensor& x_BSHDh, const RopeAngles& angles, int64_t rotary_dim) {
  if (rotary_dim == 0) return x_BSHDh;
  const int64_t half = rotary_dim / 2;
  const Tensor x = x_BSHDh.to(at_least_fp32(x_BSHDh));
  const Tensor x1 = x.narrow(-1, 0, half);
  const Tensor x2 = x.narrow(-1, half, half);
  const Tensor cos = angles.cos.to(x.scalar_type()), sin = angles.sin.to(x.scalar_type());
  std::vector<Tensor> parts{x1 * cos - x2 * sin, x2 * cos + x1 * sin};
  const int64_t head_dim = x.size(-1);
  if (rotary_dim < head_dim) parts.push_back(x.narrow(-1, rotary_dim, head_dim - rotary_dim));
  return torch::cat(parts, -1).to(x_BSHDh.scalar_type());
}

double ntk_scaled_rope_base(double base, double scale, int64_t rotary_dim) {
  const double d = static_cast<double>(rotary_dim);
  return base * std::pow(scale, d / (d - 2.0));
}

}  // namespace yuanmoe::model
