#include "yuanmoe/train/loss.h"

#include "yuanmoe/core/parallel.h"

#include <ATen/record_function.h>
#include <algorithm>
#include <torch/csrc/autograd/custom_function.h>

namespace yuanmoe::train {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Rows of logits one task handles on the CPU: 2^19 values (16 rows of a 32K vocabulary), enough
/// to amortise each block's five operator calls (blocks of 2^16 values measured slower), and
/// enough blocks to share among the threads.
int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, vocab)); }

/// Calls fn(first_row, rows) over [0, rows): on the CPU in blocks of rows_per_task rows spread over
/// the intra-op threads (each block's ATen ops then run on one thread), elsewhere once for all rows.
/// Every row's arithmetic is the same whatever the blocks, so the result does not depend on the
/// thread count.
template <typename Fn>
void for_row_blocks(const Tensor& x_TV, Fn&& fn) {
  const int64_t rows = x_TV.size(0);
  if (!x_TV.device().is_cpu()) {
    fn(int64_t{0}, rows);
    return;
  }
  const int64_t block = rows_per_task(x_TV.size(1));
  parallel_for_with_caller_state(0, (rows + block - 1) / block, 1, [&](int64_t first_block, int64_t end_block) {
    for (int64_t b = first_block; b < end_block; ++b) {
      const int64_t first = b * block;
      fn(first, std::min(block, rows - first));
    }
  });
}

/// Mean cross-entropy over the labels that are not kIgnoredLabel, with the logits' gradient
/// written once, as softmax minus one-hot (Megatron's fused vocab-parallel cross-entropy and
/// Liger's fused linear cross-entropy do the same). The forward keeps exp(x - max) per row, which
/// the backward scales in place into the gradient: no log-softmax tensor, no zero-filled one-hot,
/// and the backward does not read the logits again. The loss per row is log(sum) + max - x[label],
/// from the logits themselves, so a probability that underflows in fp32 still gives a finite loss.
/// With overwrite_logits the exponentials are written over the logits, as Megatron's
/// vocab-parallel cross-entropy subtracts the max in place: one [T, V] buffer fewer to allocate
/// and to stream through memory.
struct CrossEntropy : public torch::autograd::Function<CrossEntropy> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits_TV, const Tensor& labels_T,
                               bool overwrite_logits) {
    // One profiler event around the work the intra-op threads share: its wall time.
    RECORD_FUNCTION("yuanmoe::cross_entropy", std::vector<c10::IValue>{});
    const Tensor x_TV = logits_TV.detach().contiguous();
    const int64_t tokens = x_TV.size(0);
    const Tensor counted_T = labels_T != kIgnoredLabel;
    const Tensor label_T1 = labels_T.masked_fill(counted_T.logical_not(), 0).unsqueeze(1);
    Tensor exp_TV = overwrite_logits ? x_TV : torch::empty_like(x_TV);
    Tensor sum_T1 = torch::empty({tokens, 1}, x_TV.options());
    Tensor loss_T1 = torch::empty({tokens, 1}, x_TV.options());
    for_row_blocks(x_TV, [&](int64_t first, int64_t rows) {
      const Tensor x = x_TV.narrow(0, first, rows);
      Tensor exp = exp_TV.narrow(0, first, rows), sum = sum_T1.narrow(0, first, rows);
      const Tensor label_logit = x.gather(1, label_T1.narrow(0, first, rows));  // before exp may overwrite x
      const Tensor max = x.amax(1, /*keepdim=*/true);
      at::sub_out(exp, x, max).exp_();
      at::sum_out(sum, exp, 1, /*keepdim=*/true);
      Tensor loss = loss_T1.narrow(0, first, rows);
      at::sub_out(loss, sum.log().add_(max), label_logit);
    });
    // Zero for ignored rows (where, not a product: their logits may be anything), then the mean;
    // every label ignored gives 0 / 1 = 0.
    const Tensor count = counted_T.sum().clamp_min(1).to(x_TV.scalar_type());
    const Tensor loss = torch::where(counted_T.unsqueeze(1), loss_T1, torch::zeros({}, loss_T1.options())).sum() / count;
    ctx->saved_data["exp"] = exp_TV;
    ctx->saved_data["sum"] = sum_T1;
    ctx->saved_data["labels"] = label_T1;
    ctx->saved_data["counted"] = counted_T;
    ctx->saved_data["count"] = count;
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The gradient is written over the saved exponentials, so they serve one backward only.
    TORCH_CHECK(ctx->saved_data.find("used") == ctx->saved_data.end(),
                "language_model_loss: backward ran twice through the same graph (retain_graph is not supported)");
    ctx->saved_data["used"] = true;
    Tensor grad_TV = ctx->saved_data["exp"].toTensor();
    const Tensor sum_T1 = ctx->saved_data["sum"].toTensor(), label_T1 = ctx->saved_data["labels"].toTensor();
    const Tensor counted_T1 = ctx->saved_data["counted"].toTensor().unsqueeze(1);
    const Tensor scale = grad_outputs[0].to(grad_TV.scalar_type()) / ctx->saved_data["count"].toTensor();
    // d loss / d x = scale (exp / sum - onehot) on counted rows, 0 on ignored ones (exp <= 1, so
    // the zero scale gives zeros unless the row's logits are not finite, as with log_softmax).
    const Tensor scale_T1 = torch::where(counted_T1, scale, torch::zeros({}, scale.options()));
    for_row_blocks(grad_TV, [&](int64_t first, int64_t rows) {
      Tensor grad = grad_TV.narrow(0, first, rows);
      const Tensor row_scale = scale_T1.narrow(0, first, rows);
      grad.mul_(row_scale / sum_T1.narrow(0, first, rows));
      const Tensor labels = label_T1.narrow(0, first, rows);
      grad.scatter_add_(1, labels, -row_scale);
    });
    return {grad_TV, Tensor(), Tensor()};
  }
};

}  // namespace

Tensor language_model_loss(const Tensor& logits_BSV, const Tensor& labels_BS, bool overwrite_logits) {
  const int64_t vocab = logits_BSV.size(-1);
  const Tensor logits_TV = logits_BSV.reshape({-1, vocab});
  const Tensor labels_T = labels_BS.reshape({-1}).to(logits_TV.device());
  return CrossEntropy::apply(logits_TV.to(at_least_fp32(logits_TV)), labels_T, overwrite_logits)[0];
}

int64_t counted_labels(const Tensor& labels) {
  TORCH_CHECK(labels.device().is_cpu(), "counted_labels: labels on ", labels.device(), ", expected the host");
  const Tensor values = labels.to(torch::kLong).contiguous();
  const int64_t* first = values.data_ptr<int64_t>();
  return std::count_if(first, first + values.numel(), [](int64_t label) { return label != kIgnoredLabel; });
}

}  // namespace yuanmoe::train
