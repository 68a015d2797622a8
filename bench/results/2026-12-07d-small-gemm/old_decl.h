#pragma once
#include "yuanmoe/core/types.h"
namespace yuanmoe { namespace old {
void small_mm_into(Tensor out, const Tensor& a, const Tensor& b);
void small_mm_add_into(Tensor out, const Tensor& a, const Tensor& b);
void transpose_into(Tensor dst, const Tensor& src);
bool small_mm_kernel_available();
} }
