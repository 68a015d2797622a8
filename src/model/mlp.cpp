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
  // unbind / split_with_sizes, not w1[e] / narrow: their backward assembles all experts' grads in
  // one stack / cat, where one select or narrow per expert would each allocate and add a
  // zero-filled gradient of the whole [E, 2F, D] weight (E times the memory traffic).
  const std::vector<Tensor> w1_e = w1.unbind(0), w2_e = w2.unbind(0);
  const std::vector<Tensor> xs_e = xs_ND.split_with_sizes(rows_per_expert, 0);
  std::vector<Tensor> outputs;
  outputs.reserve(rows_per_expert.size());
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    if (rows_per_expert[e] == 0) continue;
    outputs.push_back(swiglu(xs_e[e], w1_e[e], w2_e[e]));
  }
  if (outputs.empty()) return xs_ND.new_zeros({0, w2.size(1)});
  return torch::cat(outputs, 0);
}

}  // namespace yuanmoe::model
