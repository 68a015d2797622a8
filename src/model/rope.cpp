#include "yuanmoe/model/rope.h"

#include <cmath>

namespace yuanmoe::model {

namespace {

/// x rounded to the nearest bf16 value, kept in fp32.
Tensor round_to_bf16(const Tensor& x) { return x.to(torch::kBFloat16).to(torch::kFloat); }

}  // namespace

Tensor rope_inverse_frequencies(int64_t rotary_dim, double base, config::RopeTables tables) {
  // In double, then one rounding to fp32. Both references hold inv_freq in bf16: HF casts the
  // buffer, Megatron's Float16Module rounds it (max relative error 0.37%, §12.2).
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
