// Partial rotary position embedding, NeoX "rotate-half" form (yuan2-m32.md §4.2): the first
// rotary_dim dims of each head are rotated, pairing dim i with i + rotary_dim/2; the rest pass.
// Tables are computed in fp32 from exact integer positions (the default of §12.2); the other
// RopeTables modes reproduce the bf16 rounding of the HF or Megatron reference for parity checks.
#pragma once

#include "yuanmoe/config/config.h"
#include "yuanmoe/core/types.h"

namespace yuanmoe::model {

/// theta_i = base^(-2i / rotary_dim), i in [0, rotary_dim/2). [rotary_dim/2] fp32 (rounded to
/// bf16 values in both bf16 modes).
Tensor rope_inverse_frequencies(int64_t rotary_dim, double base,
                                config::RopeTables tables = config::RopeTables::kExact);

/// cos/sin of position * theta for every token: each [B, S, 1, rotary_dim/2] fp32,
/// broadcastable over heads.
struct RopeAngles {
  Tensor cos;
  Tensor sin;
};
/// kHfBf16 rounds positions, angles and cos/sin to bf16 as the HF code does (positions above 256
/// are quantised: 257 -> 256); the tables stay fp32 tensors.
RopeAngles rope_angles(const Tensor& inverse_frequencies, const Tensor& position_ids_BS,
                       config::RopeTables tables = config::RopeTables::kExact);

/// Rotates x_BSHDh (any float dtype, computed in fp32) on its first rotary_dim dims.
Tensor apply_rope(const Tensor& x_BSHDh, const RopeAngles& angles, int64_t rotary_dim);

/// NTK-aware base for stretching the context by `scale` (paper §4.2):
/// b' = b * scale^(rotary_dim / (rotary_dim - 2)); 10000 at 4x, rotary_dim 128 -> 40890.
double ntk_scaled_rope_base(double base, double scale, int64_t rotary_dim);

}  // namespace yuanmoe::model
