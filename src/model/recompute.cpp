#include "yuanmoe/model/recompute.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

namespace yuanmoe::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// The state a rerun must reproduce: RNG (dropout) and autocast (bf16 casts).
struct ForwardState {
  Tensor cpu_rng;
  bool cpu_autocast = false;
  c10::ScalarType cpu_autocast_dtype = torch::kBFloat16;

  static ForwardState capture() {
    ForwardState s;
    s.cpu_rng = at::detail::getDefaultCPUGenerator().get_state();
    s.cpu_autocast = at::autocast::is_autocast_enabled(at::kCPU);
    s.cpu_autocast_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    return s;
  }
  void save_to(AutogradContext* ctx) const {
    ctx->saved_data["rng"] = cpu_rng;
    ctx->saved_data["autocast"] = cpu_autocast;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(cpu_autocast_dtype);
  }
  static ForwardState saved_in(AutogradContext* ctx) {
    ForwardState s;
    s.cpu_rng = ctx->saved_data["rng"].toTensor();
    s.cpu_autocast = ctx->saved_data["autocast"].toBool();
    s.cpu_autocast_dtype = static_cast<c10::ScalarType>(ctx->saved_data["autocast_dtype"].toInt());
    return s;
  }
  void apply() const {
    at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle: shares the state
    generator.set_state(cpu_rng);
    at::autocast::set_autocast_enabled(at::kCPU, cpu_autocast);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_autocast_dtype);
  }
};

struct BlockRecompute : public torch::autograd::Function<BlockRecompute> {
  // The block travels as its address: saved_data holds IValues only, and the block outlives the
  // graph (it belongs to the model).
  static variable_list forward(AutogradContext* ctx, const Tensor& x_BSD, const Tensor& position_ids_BS,
                               int64_t block_address) {
    ctx->saved_data["block"] = block_address;
    ForwardState::capture().save_to(ctx);
    ctx->save_for_backward({x_BSD, position_ids_BS});
    auto* block = reinterpret_cast<TransformerBlockImpl*>(block_address);
    const BlockOutput out = block->forward(x_BSD, position_ids_BS);  // grad mode is off here
    const Tensor aux = out.aux_loss.defined() ? out.aux_loss : torch::zeros({}, x_BSD.options());
    const Tensor pairs_E = out.pairs_per_expert_E.defined()
                               ? out.pairs_per_expert_E
                               : torch::zeros({0}, x_BSD.options().dtype(torch::kLong));
    ctx->mark_non_differentiable({pairs_E});
    return {out.x, aux, pairs_E};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor x_BSD = saved[0].detach().requires_grad_(true);
    auto* block = reinterpret_cast<TransformerBlockImpl*>(ctx->saved_data["block"].toInt());

    const ForwardState now = ForwardState::capture();
    ForwardState::saved_in(ctx).apply();
    BlockOutput out;
    {
      torch::AutoGradMode grad_mode(true);
      out = block->forward(x_BSD, saved[1]);
    }
    now.apply();

    variable_list outputs{out.x}, grads{grad_outputs[0]};
    if (out.aux_loss.defined() && out.aux_loss.requires_grad() && grad_outputs[1].defined()) {
      outputs.push_back(out.aux_loss);
      grads.push_back(grad_outputs[1]);
    }
    torch::autograd::backward(outputs, grads);  // reentrant: parameter grads accumulate here
    return {x_BSD.grad(), Tensor(), Tensor()};
  }
};

}  // namespace

BlockOutput recompute_block(TransformerBlockImpl& block, const Tensor& x_BSD, const Tensor& position_ids_BS) {
  const variable_list out =
      BlockRecompute::apply(x_BSD, position_ids_BS, reinterpret_cast<int64_t>(&block));
  BlockOutput result{out[0], out[1], out[2]};
  if (result.pairs_per_expert_E.numel() == 0) result.pairs_per_expert_E = Tensor();
  return result;
}

}  // namespace yuanmoe::model
