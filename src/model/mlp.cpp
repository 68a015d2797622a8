#include "yuanmoe/model/mlp.h"

namespace yuanmoe::model {

Tensor swiglu(const Tensor& x_TD, const Tensor& w1_2FD, const Tensor& w2_DF) {
  const Tensor u_T2F = torch::matmul(x_TD, w1_2FD.t());
  const int64_t ffn = w1_2FD.size(0) / 2;
  const Tensor h_TF = torch::silu(u_T2F.narrow(-1, 0, ffn)) * u_T2F.narrow(-1, ffn, ffn);
  return torch::matmul(h_TF, w2_DF.t());
}

DenseMlpImpl::DenseMlpImpl(int64_t hidden_size, int64_t ffn_hidden_size) {
  w1 = register_module(
      "w1", torch::nn::Linear(torch::nn::LinearOptions(hidden_size, 2 * ffn_hidden_size).bias(false)));
  w2 = register_module(
      "w2", torch::nn::Linear(torch::nn::LinearOptions(ffn_hidden_size, hidden_size).bias(false)));
}

Tensor DenseMlpImpl::forward(const Tensor& x) { return swiglu(x, w1->weight, w2->weight); }

GroupedExpertsImpl::GroupedExpertsImpl(int64_t num_experts,
                                       int64_t hidden_size,
                                       int64_t ffn_hidden_size) {
  // Values are written by init_weights(); empty() would leave garbage, so start from zeros.
  w1 = register_parameter("w1", torch::zeros({num_experts, 2 * ffn_hidden_size, hidden_size}));
  w2 = register_parameter("w2", torch::zeros({num_experts, hidden_size, ffn_hidden_size}));
}

Tensor GroupedExpertsImpl::forward(const Tensor& xs_ND, const std::vector<int64_t>& rows_per_expert) {
  std::vector<Tensor> outputs;
  outputs.reserve(rows_per_expert.size());
  int64_t offset = 0;
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    const int64_t rows = rows_per_expert[e];
    if (rows == 0) continue;
    outputs.push_back(swiglu(xs_ND.narrow(0, offset, rows), w1[e], w2[e]));
    offset += rows;
  }
  if (outputs.empty()) return xs_ND.new_zeros({0, w2.size(1)});
  return torch::cat(outputs, 0);
}

}  // namespace yuanmoe::model
