#include "yuanmoe/model/recompute.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

namespace yuanmoe::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// The state a rerun must reproduce: RNG (dropout) and autocast (bf16 casts), of the CPU and of
/// the block's CUDA device when it has one.
struct ForwardState {
  Tensor cpu_rng;
  std::optional<Tensor> cuda_rng;
  std::optional<torch::Device> cuda_device;
  bool cpu_autocast = false, cuda_autocast = false;
  c10::ScalarType cpu_autocast_dtype = torch::kBFloat16, cuda_autocast_dtype = torch::kBFloat16;

  static ForwardState capture(const torch::Device& device) {
    ForwardState s;
    s.cpu_rng = at::detail::getDefaultCPUGenerator().get_state();
    s.cpu_autocast = at::autocast::is_autocast_enabled(at::kCPU);
    s.cpu_autocast_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    if (device.is_cuda()) {
      s.cuda_device = device;
      s.cuda_rng = at::globalContext().defaultGenerator(device).get_state();
      s.cuda_autocast = at::autocast::is_autocast_enabled(at::kCUDA);
      s.cuda_autocast_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
    }
    return s;
  }
  void apply() const {
    at::Generator cpu = at::detail::getDefaultCPUGenerator();  // a handle: shares the state
    cpu.set_state(cpu_rng);
    at::autocast::set_autocast_enabled(at::kCPU, cpu_autocast);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_autocast_dtype);
    if (cuda_device) {
      at::Generator cuda = at::globalContext().defaultGenerator(*cuda_device);
      cuda.set_state(*cuda_rng);
      at::autocast::set_autocast_enabled(at::kCUDA, cuda_autocast);
      at::autocast::set_autocast_dtype(at::kCUDA, cuda_autocast_dtype);
    }
  }
};

/// The block and the state of its first run, carried through the autograd context (whose
/// saved_data holds IValues: a capsule holds them by reference count, the block belongs to the
/// model and outlives the graph).
struct RecomputeContext : torch::CustomClassHolder {
  TransformerBlockImpl* block = nullptr;
  ForwardState state;
  // The rerun sees the first run's positions and document ids. Held here, not as
  // inputs of the Function: its inputs must be defined tensors, and these may be undefined.
  TokenLayout tokens;
  Tensor rerun_record;  // what the first run's router balanced with (TransformerBlockImpl::rerun_record)
};

struct BlockRecompute : public torch::autograd::Function<BlockRecompute> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_BSD, c10::IValue context) {
    ctx->saved_data["context"] = context;
    ctx->save_for_backward({x_BSD});
    auto* first_run = static_cast<RecomputeContext*>(context.toCapsule().get());
    TransformerBlockImpl& block = *first_run->block;
    const BlockOutput out = block.forward(x_BSD, first_run->tokens);  // grad mode is off here
    first_run->rerun_record = block.rerun_record();
    const Tensor aux = out.aux_loss.defined() ? out.aux_loss : torch::zeros({}, x_BSD.options());
    const Tensor pairs_E = out.routed_pairs_E.defined()
                               ? out.routed_pairs_E
                               : torch::zeros({0}, x_BSD.options().dtype(torch::kLong));
    ctx->mark_non_differentiable({pairs_E});
    return {out.x, aux, pairs_E};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor x_BSD = saved[0].detach().requires_grad_(true);
    auto* context = static_cast<RecomputeContext*>(ctx->saved_data["context"].toCapsule().get());

    const ForwardState now = ForwardState::capture(x_BSD.device());
    context->state.apply();
    BlockOutput out;
    {
      torch::AutoGradMode grad_mode(true);
      context->block->rerun_next_forward(context->rerun_record);  // the first run's balancing statistics
      out = context->block->forward(x_BSD, context->tokens);
    }
    now.apply();

    variable_list outputs{out.x}, grads{grad_outputs[0]};
    if (out.aux_loss.defined() && out.aux_loss.requires_grad() && grad_outputs[1].defined()) {
      outputs.push_back(out.aux_loss);
      grads.push_back(grad_outputs[1]);
    }
    torch::autograd::backward(outputs, grads);  // reentrant: parameter grads accumulate here
    return {x_BSD.grad(), Tensor()};
  }
};

}  // namespace

BlockOutput recompute_block(TransformerBlockImpl& block, const Tensor& x_BSD, const TokenLayout& tokens) {
  auto context = c10::make_intrusive<RecomputeContext>();
  context->block = &block;
  context->state = ForwardState::capture(x_BSD.device());  // before the first run draws anything
  context->tokens = tokens;
  const variable_list out = BlockRecompute::apply(x_BSD, c10::IValue::make_capsule(std::move(context)));
  BlockOutput result{out[0], out[1], out[2]};
  if (result.routed_pairs_E.numel() == 0) result.routed_pairs_E = Tensor();
  return result;
}

void apply_recompute(TransformerImpl& model, bool enabled) {
  model.block_wrapper = enabled ? TransformerImpl::BlockWrapper(recompute_block) : TransformerImpl::BlockWrapper();
}

}  // namespace yuanmoe::model
