#include "yuanmoe/train/pipeline.h"

#include <chrono>
#include <deque>

#include "yuanmoe/parallel/schedule.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/precision.h"
#include "yuanmoe/train/token_layout.h"

namespace yuanmoe::train {

namespace {

// Gloo matches point-to-point messages by (peer, tag): one tag per micro-batch and direction.
int forward_tag(int64_t micro_batch) { return static_cast<int>(2 * micro_batch); }
int backward_tag(int64_t micro_batch) { return static_cast<int>(2 * micro_batch + 1); }

/// What a forward leaves for its backward.
struct InFlight {
  Tensor input;  // received activation (requires grad); undefined on the first stage
  Tensor output; // sent activation, or the loss on the last stage
  Tensor aux;    // this stage's router terms; undefined when none
};

/// What stages send each other: fp32, or fp64 when the weights are (train.precision = fp64).
torch::Dtype activation_dtype(const model::TransformerImpl& model) {
  return model.parameters().front().scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

Tensor activation_buffer(const data::Batch& batch, int64_t hidden, torch::Device device, torch::Dtype dtype) {
  return torch::empty({batch.tokens.size(0), batch.tokens.size(1), hidden},
                      torch::dtype(dtype).device(device));  // [B, S, D]
}

/// This stage's forward of one micro-batch (its tokens, or the previous stage's activations)
/// under the run's precision. Every stage builds the layout (positions, document ids) from its
/// own copy of the micro-batch: only activations travel between stages.
model::ModelOutput stage_forward(model::TransformerImpl& model, const Tensor& x, const data::Batch& batch,
                                 config::Precision precision, const torch::Device& device) {
  AutocastScope autocast(precision, device);
  return model.forward(x, token_layout(batch, device));
}

}  // namespace

PipelineStepResult run_pipeline_step(model::TransformerImpl& model, parallel::ParallelContext& parallel,
                                     const PipelineStepOptions& options, const std::vector<data::Batch>& batches) {
  const auto micro_batches = static_cast<int64_t>(batches.size());
  TORCH_CHECK(static_cast<int64_t>(options.lm_loss_scales.size()) == micro_batches, "run_pipeline_step: ",
              options.lm_loss_scales.size(), " LM loss scales for ", micro_batches, " micro-batches");
  const parallel::ParallelLayout& layout = parallel.layout();
  parallel::Group& pp = parallel.pp;
  const torch::Device device = model.parameters().front().device();
  const int64_t hidden = model.config.hidden_size;
  const torch::Dtype dtype = activation_dtype(model);
  const bool first = layout.first_stage(), last = layout.last_stage();

  PipelineStepResult result;
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const auto timed_wait = [&](auto&& blocking_call) {
    const Clock::time_point t0 = Clock::now();
    blocking_call();
    result.wait_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  };
  const auto fp64 = torch::dtype(torch::kDouble).device(device);
  std::vector<Tensor> lm_losses;
  Tensor aux_sum = torch::zeros({}, fp64);
  std::deque<InFlight> in_flight;  // forwards whose backward is pending, oldest first
  std::vector<parallel::Pending> sends;

  const std::vector<parallel::PipelineAction> schedule =
      parallel::pipeline_schedule(options.schedule, layout.pp, layout.stage, micro_batches);
  size_t last_backward = 0;
  for (size_t k = 0; k < schedule.size(); ++k) {
    if (schedule[k].kind == parallel::PipelineAction::kBackward) last_backward = k;
  }
  for (size_t k = 0; k < schedule.size(); ++k) {
    const parallel::PipelineAction& action = schedule[k];
    const int64_t i = action.micro_batch;
    const double lm_scale = options.lm_loss_scales[static_cast<size_t>(i)];
    if (action.kind == parallel::PipelineAction::kForward) {
      const data::Batch& batch = batches[static_cast<size_t>(i)];
      InFlight state;
      Tensor x;
      if (first) {
        x = batch.tokens.to(device, /*non_blocking=*/true);
      } else {
        state.input = activation_buffer(batch, hidden, device, dtype);
        timed_wait([&] { pp.recv(state.input, layout.stage - 1, forward_tag(i)); });
        state.input.requires_grad_(true);
        x = state.input;
      }
      const model::ModelOutput out = stage_forward(model, x, batch, options.precision, device);
      state.aux = out.aux_loss;
      if (out.aux_loss.defined()) aux_sum += out.aux_loss.detach().to(torch::kDouble);
      if (out.routed_pairs_LE.defined()) {
        result.routed_pairs_LE = result.routed_pairs_LE.defined() ? result.routed_pairs_LE + out.routed_pairs_LE : out.routed_pairs_LE;
      }
      if (last) {
        const Tensor lm_loss =
            language_model_loss(out.out, batch.labels.to(device, /*non_blocking=*/true), /*overwrite_logits=*/true);
        lm_losses.push_back(lm_loss.detach().to(torch::kDouble));
        // The scalar whose backward seeds this micro-batch's gradients (kept apart: scales differ).
        state.output = out.aux_loss.defined()
                           ? lm_loss * lm_scale + out.aux_loss.to(lm_loss.scalar_type()) * options.aux_loss_scale
                           : lm_loss * lm_scale;
      } else {
        state.output = out.out;
        sends.push_back(pp.send(out.out.detach().to(dtype), layout.stage + 1, forward_tag(i)));
      }
      in_flight.push_back(std::move(state));
    } else {
      InFlight state = std::move(in_flight.front());
      in_flight.pop_front();
      if (k == last_backward && options.before_last_backward) options.before_last_backward();
      if (last) {
        state.output.backward();
      } else {
        Tensor grad = activation_buffer(batches[static_cast<size_t>(i)], hidden, device, dtype);
        timed_wait([&] { pp.recv(grad, layout.stage + 1, backward_tag(i)); });
        std::vector<Tensor> outputs{state.output}, grads{grad.to(state.output.scalar_type())};
        if (state.aux.defined()) {
          outputs.push_back(state.aux);
          grads.push_back(torch::full_like(state.aux, options.aux_loss_scale));
        }
        torch::autograd::backward(outputs, grads);
      }
      if (!first) sends.push_back(pp.send(state.input.grad().to(dtype), layout.stage - 1, backward_tag(i)));
    }
  }
  timed_wait([&] {
    for (auto& send : sends) send.wait();
  });
  // Still on the device: the step reads them back with its other figures, once (train/step.cpp).
  result.lm_losses_M = last ? torch::stack(lm_losses) : torch::zeros({micro_batches}, fp64);
  result.aux_loss_sum = aux_sum;
  result.wall_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

model::ModelOutput pipeline_forward(model::TransformerImpl& model, parallel::ParallelContext& parallel,
                                    const data::Batch& batch, config::Precision precision) {
  const parallel::ParallelLayout& layout = parallel.layout();
  const torch::Device device = model.parameters().front().device();
  Tensor x;
  if (layout.first_stage()) {
    x = batch.tokens.to(device);
  } else {
    x = activation_buffer(batch, model.config.hidden_size, device, activation_dtype(model));
    parallel.pp.recv(x, layout.stage - 1, forward_tag(0));
  }
  model::ModelOutput out = stage_forward(model, x, batch, precision, device);
  if (!layout.last_stage()) {
    parallel.pp.send(out.out.to(activation_dtype(model)), layout.stage + 1, forward_tag(0)).wait();
    out.out = Tensor();
  }
  return out;
}

}  // namespace yuanmoe::train
