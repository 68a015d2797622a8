#include "yuanmoe/model/norm.h"

namespace yuanmoe::model {

RmsNormImpl::RmsNormImpl(int64_t dim, double eps) : eps(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

Tensor RmsNormImpl::forward(const Tensor& x) {
  const Tensor x32 = x.to(at_least_fp32(x));
  const Tensor inv_rms = torch::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (x32 * inv_rms * weight.to(x32.scalar_type())).to(x.scalar_type());
}

}  // namespace yuanmoe::model
