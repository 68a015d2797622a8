#include "yuanmoe/train/benchmark.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <set>
#include <sstream>

#include "yuanmoe/config/derived.h"
#include "yuanmoe/core/memory.h"
#include "yuanmoe/data/indexed_dataset.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/attention_cpu.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/recompute.h"
#include "yuanmoe/model/transformer.h"
#include "yuanmoe/parallel/process_groups.h"
#include "yuanmoe/train/checkpointer.h"
#include "yuanmoe/train/evaluate.h"
#include "yuanmoe/train/loss.h"
#include "yuanmoe/train/mfu.h"
#include "yuanmoe/train/pipeline.h"
#include "yuanmoe/train/precision.h"
#include "yuanmoe/train/step.h"
#include "yuanmoe/train/token_layout.h"
#include "yuanmoe/train/training_data.h"

namespace yuanmoe::train {

namespace {

using Clock = std::chrono::steady_clock;

/// Blocks until `device` has finished its queued work (CUDA runs asynchronously).
void wait_for(const torch::Device& device) {
  if (device.is_cuda()) torch::zeros({1}, torch::TensorOptions().device(device)).sum().item<float>();
}

double seconds_of(const std::function<void()>& fn, const torch::Device& device) {
  const auto start = Clock::now();
  fn();
  wait_for(device);
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Median of `repeats` runs after one warm-up run.
double median_seconds(const std::function<void()>& fn, int64_t repeats, const torch::Device& device) {
  fn();
  std::vector<double> times;
  for (int64_t i = 0; i < repeats; ++i) times.push_back(seconds_of(fn, device));
  return median(times);
}

/// A and B alternately (A B A B ...), so that drift in the machine's speed hits both alike.
std::pair<double, double> interleaved_medians(const std::function<void()>& a, const std::function<void()>& b,
                                              int64_t repeats, const torch::Device& device) {
  a();
  b();
  std::vector<double> times_a, times_b;
  for (int64_t i = 0; i < repeats; ++i) {
    times_a.push_back(seconds_of(a, device));
    times_b.push_back(seconds_of(b, device));
  }
  return {median(times_a), median(times_b)};
}

/// Forward + backward of `fn` with an all-ones output gradient (the graph is freed after).
std::function<void()> forward_backward(const std::function<Tensor()>& fn) {
  return [fn] {
    const Tensor out = fn();
    out.backward(torch::ones_like(out));
  };
}

AttentionKernelTime measure_attention_kernel(const config::RunConfig& config, const BenchOptions& options,
                                             const torch::Device& device) {
  const auto& m = config.model;
  AttentionKernelTime out{options.attention_kernel, config.train.micro_batch_size, m.num_attention_heads,
                          config.train.seq_length, m.head_dim};
  std::optional<config::AttentionKernel> kernel;
  for (const auto& [value, name] : config::enum_names<config::AttentionKernel>()) {
    if (out.kernel == name) kernel = value;
  }
  if (!kernel) {
    throw std::invalid_argument("--attention-kernel: expected sdpa or materialised, got '" + out.kernel + "'");
  }
  const auto qkv = [&] {
    return torch::randn({out.batch, out.heads, out.seq, out.head_dim}, torch::TensorOptions().device(device))
        .requires_grad_(true);
  };
  const Tensor q = qkv(), k = qkv(), v = qkv();
  const int64_t resident_before = current_rss_bytes();
  out.seconds = median_seconds(forward_backward([&] { return model::attention_core(*kernel, q, k, v); }), options.repeats, device);
  out.peak_extra_bytes = std::max<int64_t>(0, peak_rss_bytes() - resident_before);
  return out;
}

/// Random tokens in host memory (one document per row).
data::Batch random_batch(int64_t batch, int64_t seq, int64_t vocab) {
  const Tensor stream = torch::randint(vocab, {batch, seq + 1}, torch::kLong);
  return {stream.narrow(1, 0, seq).contiguous(), stream.narrow(1, 1, seq).contiguous(),
          model::default_position_ids(batch, seq, torch::kCPU).contiguous(), Tensor()};
}

/// The trainer's own step (train/step.h) in one process: zero grads, the pipeline schedule over
/// the micro-batches, clip, AdamW, router updates.
void measure_step(const BenchOptions& options, OptimizerStep& step, const std::vector<data::Batch>& batches,
                  const torch::Device& device, BenchReport& report) {
  for (int64_t i = 0; i < options.warmup + options.steps; ++i) {
    size_t next = 0;
    StepResult result;
    const double seconds = seconds_of([&] { result = step.run(i, [&] { return batches[next++]; }); }, device);
    report.losses.push_back(result.loss);
    if (i >= options.warmup) report.step_seconds.push_back(seconds);
  }
  report.step_median_seconds = median(report.step_seconds);
  report.tokens_per_s = static_cast<double>(report.tokens_per_step) / report.step_median_seconds;
  report.mfu = report.tokens_per_s * report.flops_per_token / report.peak_flops;
}

/// One more step under LibTorch's Kineto profiler, the trace saved to `path` (BenchOptions).
void profile_step(const std::string& path, int64_t index, OptimizerStep& step, const std::vector<data::Batch>& batches,
                  const torch::Device& device) {
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO,
                                                     /*report_input_shapes=*/true);  // GEMM rates by shape
  std::set<ActivityType> activities{ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  size_t next = 0;
  seconds_of([&] { step.run(index, [&] { return batches[next++]; }); }, device);
  torch::autograd::profiler::disableProfiler()->save(path);
}

/// Each forward stage of one micro-batch alone, on layer 0 (an MoE layer) and the head, scaled
/// to one optimizer step. Inputs have the shapes and roughly the statistics training sees.
void measure_components(const config::RunConfig& config, const BenchOptions& options, model::TransformerImpl& model,
                        OptimizerStep& step, const std::vector<data::Batch>& batches, const torch::Device& device,
                        BenchReport& report) {
  const auto& m = config.model;
  const int64_t micro = static_cast<int64_t>(batches.size());
  const int64_t moe_layers = model::count_moe_layers(config.moe, 0, m.num_layers);
  const int64_t dense_layers = m.num_layers - moe_layers;
  const data::Batch& batch = batches.front();
  const int64_t mb = batch.tokens.size(0), seq = batch.tokens.size(1);
  AutocastScope autocast(config.train.precision, device);

  model::TransformerBlockImpl& block = *model.blocks.front();
  model::AttentionImpl& attention = *block.self_attn;
  const Tensor x_BSD = model.embed_tokens(batch.tokens).detach().requires_grad_(true);
  const Tensor a_BSD = block.input_layernorm(x_BSD).detach().requires_grad_(true);
  const Tensor m_TD = block.post_attention_layernorm(x_BSD).detach().reshape({-1, m.hidden_size}).requires_grad_(true);
  const auto qkv = [&] {
    return torch::randn({mb, m.num_attention_heads, seq, m.head_dim}, x_BSD.options()).requires_grad_(true);
  };
  const Tensor q = qkv(), k = qkv(), v = qkv();
  const model::TokenLayout tokens = token_layout(batch, device);  // document ids with data.reset_attention_mask

  const auto time = [&](const std::function<void()>& fn) { return median_seconds(fn, options.repeats, device); };
  const auto per_step = [&](double seconds, int64_t per_micro_batch) {
    return seconds * static_cast<double>(per_micro_batch * micro);
  };
  std::vector<ComponentTime>& out = report.components;
  const size_t first = out.size();
  out.push_back({"embedding", per_step(time([&] { model.embed_tokens(batch.tokens); }), 1)});
  // The attention module minus its LFA and its core: the Q/K/V/O projections and RoPE.
  const double lfa = time([&] { attention.lf_gate(a_BSD, nullptr, tokens.document_ids_BS); });
  const double core = time([&] { model::attention_core(m.attention, q, k, v, 0.0, 0, tokens.document_ids_BS); });
  const double whole_attention = time([&] { attention.forward(a_BSD, tokens); });
  out.push_back({"LFA (two 2-tap convs + norm)", per_step(lfa, m.num_layers)});
  out.push_back({"Q/K/V/O projections + RoPE", per_step(std::max(0.0, whole_attention - lfa - core), m.num_layers)});
  out.push_back({"attention core", per_step(core, m.num_layers)});
  out.push_back({"RMSNorms (2 per layer + final)",
                 per_step(time([&] { block.input_layernorm(x_BSD); }), 2 * m.num_layers + 1)});
  if (moe_layers > 0) {
    // Through the layer's own router, dispatcher and experts, with the kernel the step picks.
    model::MoeImpl& moe = *block.moe;
    model::TokenDispatcher& dispatcher = *moe.dispatcher;
    const bool grouped_mm = moe.experts->uses_grouped_mm(m_TD);
    const model::Routing routing = moe.gate->forward(m_TD);
    const model::ExpertInput input = dispatcher.dispatch(m_TD, routing, /*host_counts=*/!grouped_mm);
    const Tensor ys_MD = moe.experts->forward(input).detach().requires_grad_(true);
    out.push_back({"router", per_step(time([&] { moe.gate->forward(m_TD); }), moe_layers)});
    out.push_back({"dispatch (sort, counts, gather)",
                   per_step(time([&] { dispatcher.dispatch(m_TD, routing, /*host_counts=*/!grouped_mm); }), moe_layers)});
    out.push_back({grouped_mm ? "experts (at::_grouped_mm)" : "experts (grouped SwiGLU GEMMs)",
                   per_step(time([&] { moe.experts->forward(input); }), moe_layers)});
    out.push_back({"combine (gates, scatter, slot sum)", per_step(time([&] { dispatcher.combine(ys_MD); }), moe_layers)});
  }
  if (dense_layers > 0) {
    model::DenseMlp dense(m.hidden_size, config.moe.dense_layer_ffn_size());
    dense->to(device);
    out.push_back({"dense FFN layers", per_step(time([&] { dense(m_TD); }), dense_layers)});
  }
  const Tensor& head_weight = m.tie_embeddings ? model.embed_tokens->weight : model.lm_head->weight;
  out.push_back({"head + loss", per_step(time([&] {
                                           language_model_loss(torch::matmul(model.norm(x_BSD), head_weight.t()),
                                                               batch.labels, /*overwrite_logits=*/true);
                                         }),
                                         1)});
  double attributed = 0.0;
  for (size_t i = first; i < out.size(); ++i) attributed += out[i].seconds;

  // The whole forward (+ loss) of one step, and the step's forward + backward, measured as the
  // trainer runs them; backward is their difference.
  report.forward_seconds = time([&] {
    for (const auto& b : batches) {
      language_model_loss(model.forward(b.tokens, token_layout(b, device)).out, b.labels, /*overwrite_logits=*/true);
    }
  });
  StepResult last;
  const double forward_backward_seconds = time([&] {
    size_t next = 0;
    last = step.forward_backward(0, [&] { return batches[next++]; });
  });
  out.push_back({"other forward (residuals, reshapes; forward - parts)",
                 std::max(0.0, report.forward_seconds - attributed)});
  out.push_back({"backward (step fwd+bwd - forward)", std::max(0.0, forward_backward_seconds - report.forward_seconds)});

  // The rest of the step (clip, AdamW, router updates) on the gradients the last pass left.
  out.push_back({"optimizer (clip + AdamW + router updates)", time([&] { step.apply(0, last); })});
}

/// Side-by-side pairs, forward + backward: MoE block vs the dense FFN of the same active FLOPs,
/// libtorch's fused SDPA vs materialised attention, and on the CPU our attention kernel vs SDPA. Under the step's precision (bf16 autocast on
/// a GPU), so each side runs the kernels the step runs: _grouped_mm's bf16 kernel, not its fp32
/// fallback.
void measure_pairs(const config::RunConfig& config, const BenchOptions& options, model::TransformerImpl& model,
                   const std::vector<data::Batch>& batches, const torch::Device& device, BenchReport& report) {
  AutocastScope autocast(config.train.precision, device);
  const auto& m = config.model;
  const data::Batch& batch = batches.front();
  const int64_t mb = batch.tokens.size(0), seq = batch.tokens.size(1);
  model::TransformerBlockImpl& block = *model.blocks.front();
  const Tensor m_TD =
      torch::randn({mb * seq, m.hidden_size}, torch::TensorOptions().device(device)).requires_grad_(true);

  if (block.moe) {
    model::DenseMlp dense(m.hidden_size, config.moe.top_k * config.moe.ffn_hidden_size);
    dense->to(device);
    model::init_weights(*dense, m, config.train.seed);
    const auto [moe_s, dense_s] =
        interleaved_medians(forward_backward([&] { return block.moe->forward(m_TD).out; }),
                            forward_backward([&] { return dense(m_TD); }), options.repeats, device);
    report.pairs.push_back({"MoE block vs dense SwiGLU of equal active FLOPs (fwd+bwd, " +
                                std::to_string(mb * seq) + " tokens)",
                            "MoE (" + std::to_string(config.moe.num_experts) + " experts, top-" +
                                std::to_string(config.moe.top_k) + ", router included)",
                            "dense FFN width " + std::to_string(config.moe.top_k * config.moe.ffn_hidden_size),
                            moe_s, dense_s});
    // The MoE block's two big parts alone against the same dense FFN: the grouped expert GEMMs
    // (same FLOPs as the dense FFN) and the router.
    model::MoeImpl& moe = *block.moe;
    const bool grouped_mm = moe.experts->uses_grouped_mm(m_TD);
    // Both kernels' inputs: the row counts on the host and the offsets on the device.
    model::ExpertInput input = moe.dispatcher->dispatch(m_TD, moe.gate->forward(m_TD), /*host_counts=*/true);
    input.xs_MD = input.xs_MD.detach().requires_grad_(true);
    const auto [experts_s, dense2_s] = interleaved_medians(forward_backward([&] { return moe.experts->forward(input); }),
                                                           forward_backward([&] { return dense(m_TD); }),
                                                           options.repeats, device);
    report.pairs.push_back({"expert GEMMs alone vs the dense FFN (fwd+bwd, same FLOPs)",
                            std::string(grouped_mm ? "at::_grouped_mm" : "grouped SwiGLU loop") + ", " +
                                std::to_string(input.xs_MD.size(0)) + " rows",
                            "dense FFN", experts_s, dense2_s});
    // The two expert paths of moe.expert_gemm side by side; skipped where _grouped_mm has no
    // kernel for these operands (fp64, strides that are not multiples of 16 bytes).
    try {
      const auto [grouped_s, loop_s] = interleaved_medians(
          forward_backward([&] { return moe.experts->forward_grouped_mm(input.xs_MD, input.expert_offsets_E); }),
          forward_backward([&] { return moe.experts->forward_loop(input.xs_MD, input.rows_per_expert); }),
          options.repeats, device);
      report.pairs.push_back({"expert GEMMs: at::_grouped_mm vs our loop (fwd+bwd)", "at::_grouped_mm",
                              "loop (hand-written backward)", grouped_s, loop_s});
    } catch (const c10::Error&) {
    }
    const auto [router_s, dense3_s] =
        interleaved_medians(forward_backward([&] { return moe.gate->forward(m_TD).gates_TK; }),
                            forward_backward([&] { return dense(m_TD); }), options.repeats, device);
    report.pairs.push_back({"router alone vs the dense FFN (fwd+bwd)", config::to_string(config.moe.router) + " router",
                            "dense FFN", router_s, dense3_s});
  }
  const auto qkv = [&] {
    return torch::randn({mb, m.num_attention_heads, seq, m.head_dim}, torch::TensorOptions().device(device))
        .requires_grad_(true);
  };
  const Tensor q = qkv(), k = qkv(), v = qkv();
  const auto [sdpa_s, full_s] = interleaved_medians(
      forward_backward([&] { return model::sdpa_causal_attention(q, k, v); }),
      forward_backward([&] { return model::causal_attention(q, k, v, 0.0); }), options.repeats, device);
  report.pairs.push_back({"causal attention core (fwd+bwd, S " + std::to_string(seq) + ")", "SDPA (fused)",
                          "materialised S x S", sdpa_s, full_s});
  // The CPU kernel model.attention = sdpa runs where it applies, against libtorch's SDPA, in the
  // model's layout ([B, H, S, Dh] views of [B, S, H, Dh] rows).
  const Tensor q_BSHDh = q.detach().transpose(1, 2).contiguous().requires_grad_(true);
  const Tensor k_BSHDh = k.detach().transpose(1, 2).contiguous().requires_grad_(true);
  const Tensor v_BSHDh = v.detach().transpose(1, 2).contiguous().requires_grad_(true);
  if (model::causal_attention_cpu_applies(q_BSHDh, k_BSHDh, v_BSHDh, {})) {
    const auto bhsd = [](const Tensor& x) { return x.transpose(1, 2); };
    const auto [ours_s, libtorch_s] = interleaved_medians(
        forward_backward([&] { return model::causal_attention_cpu(q_BSHDh, k_BSHDh, v_BSHDh); }),
        forward_backward([&] { return model::sdpa_causal_attention(bhsd(q_BSHDh), bhsd(k_BSHDh), bhsd(v_BSHDh)); }),
        options.repeats, device);
    report.pairs.push_back({"causal attention core on the CPU (fwd+bwd, S " + std::to_string(seq) + ")",
                            "our CPU kernel", "libtorch SDPA (CPU flash)", ours_s, libtorch_s});
  }
}

std::string fixed(double value, int digits) {
  std::ostringstream out;
  out.setf(std::ios::fixed);
  out.precision(digits);
  out << value;
  return out.str();
}

}  // namespace

BenchReport run_benchmark(const config::RunConfig& config, const BenchOptions& options) {
  if (config.parallel.pipeline_parallel_size != 1) {
    throw std::invalid_argument(
        "parallel.pipeline_parallel_size: bench measures one process; set it to 1 (--set "
        "parallel.pipeline_parallel_size=1)");
  }
  if (options.steps < 1 || options.warmup < 0 || options.repeats < 1) {
    throw std::invalid_argument("--steps and --repeats must be >= 1, --warmup >= 0");
  }
  const torch::Device device = training_device();
  BenchReport report;
  report.device = device.is_cuda() ? "cuda" : "cpu";
  report.precision = config::to_string(config.train.precision);
  report.threads = at::get_num_threads();
  report.torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                         std::to_string(TORCH_VERSION_PATCH);
  if (!options.attention_kernel.empty()) {
    report.attention_kernel = measure_attention_kernel(config, options, device);
    report.peak_rss_bytes = peak_rss_bytes();
    return report;
  }
  const config::DerivedValues derived = config::resolve_derived(config, /*data_parallel_size=*/1);
  const MatmulRate rate_before = measure_matmul_rate(device, compute_dtype(config.train.precision));
  report.matmul_size = rate_before.size;
  report.peak_flops = rate_before.median;
  report.best_matmul_flops = rate_before.best;
  report.flops_per_token = training_flops_per_token(config);
  report.tokens_per_step = derived.tokens_per_step;

  torch::manual_seed(config.train.seed);
  model::Transformer model(config.model, config.moe);
  model->to(device);
  // On a GPU the draw happens there: a 5B-parameter model takes seconds instead of a CPU minute,
  // with other values than the CPU's (model/init.h); the step's time does not depend on them.
  model::init_weights(*model, config.model, static_cast<uint64_t>(config.train.seed),
                      device.is_cuda() ? model::InitDraw::kParameterDevice : model::InitDraw::kCpu);
  // A fine-tune's step from trained weights can cost more than from random ones (a trained
  // router's uneven loads, docs/benchmarks.md): bench measures the weights train would start from.
  if (!config.train.init_from.empty()) report.init_from = load_init_from(*model, config).first.string();
  model::apply_recompute(*model, config.train.recompute);
  model->train();
  // The step takes its micro-batches from host memory, as the trainer's sampler gives them (their
  // copies to the device are part of the step); the parts and pairs read device copies.
  std::vector<data::Batch> batches, device_batches;
  parallel::ParallelContext single_process;
  std::unique_ptr<TrainingData> data;  // the trainer's batches: data.train_prefix or data.blend, masks and all
  if (options.real_data) {
    data = std::make_unique<TrainingData>(config, single_process.layout(), [](const std::string&) {});
    report.data = config.data.blend ? "data.blend" : config.data.train_prefix;
  }
  for (int64_t i = 0; i < derived.micro_batches_per_step; ++i) {
    batches.push_back(data ? data->next_batch()
                           : random_batch(config.train.micro_batch_size, config.train.seq_length,
                                          config.model.vocab_size));
    const data::Batch& batch = batches.back();
    device_batches.push_back({batch.tokens.to(device), batch.labels.to(device), batch.position_ids.to(device),
                              batch.document_ids.defined() ? batch.document_ids.to(device) : Tensor()});
  }

  DistributedOptimizer optimizer(*model, config.train, single_process, /*shard=*/false,
                                 parallel::expert_weights(*model));
  OptimizerStep step(config, *model, optimizer, single_process);
  measure_step(options, step, batches, device, report);
  if (!options.profile_path.empty()) profile_step(options.profile_path, options.warmup + options.steps, step, batches, device);
  // The VM's speed drifts (docs/benchmarks.md): measure again right after the steps and keep the
  // higher reading, so MFU is never flattered by a slow one.
  const MatmulRate rate_after = measure_matmul_rate(device, compute_dtype(config.train.precision));
  report.peak_flops = std::max(report.peak_flops, rate_after.median);
  report.best_matmul_flops = std::max(report.best_matmul_flops, rate_after.best);
  // A stated device peak (log.peak_tflops, e.g. a GPU's dense bf16 figure) is what MFU is quoted
  // against, as in the trainer; the measured matmul rates stay in the report beside it.
  report.measured_peak_flops = report.peak_flops;
  const double model_flops_per_s = report.tokens_per_s * report.flops_per_token;
  report.mfu_measured_peak = model_flops_per_s / report.measured_peak_flops;
  if (config.log.peak_tflops > 0) {
    report.peak_flops = config.log.peak_tflops * 1e12;
    report.mfu_stated_peak = model_flops_per_s / report.peak_flops;
  }
  report.mfu = model_flops_per_s / report.peak_flops;
  if (!options.step_only) {
    measure_components(config, options, *model, step, device_batches, device, report);
    measure_pairs(config, options, *model, device_batches, device, report);
  }
  report.peak_rss_bytes = peak_rss_bytes();
  if (device.is_cuda()) {
    constexpr auto kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    report.peak_device_bytes = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[kAll].peak;
  }
  return report;
}

nlohmann::ordered_json to_json(const BenchReport& r, const config::RunConfig& config) {
  nlohmann::ordered_json j;
  j["device"] = r.device;
  j["threads"] = r.threads;
  j["torch_version"] = r.torch_version;
  j["init_from"] = r.init_from;
  j["data"] = r.data;
  if (r.attention_kernel) {
    const AttentionKernelTime& a = *r.attention_kernel;
    j["attention_kernel"] = {{"kernel", a.kernel}, {"batch", a.batch}, {"heads", a.heads}, {"seq", a.seq},
                             {"head_dim", a.head_dim}, {"seconds", a.seconds}, {"peak_extra_bytes", a.peak_extra_bytes}};
    j["peak_rss_bytes"] = r.peak_rss_bytes;
    return j;
  }
  j["precision"] = r.precision;
  j["peak_flops"] = r.peak_flops;
  j["measured_peak_flops"] = r.measured_peak_flops;
  j["best_matmul_flops"] = r.best_matmul_flops;
  j["matmul_size"] = r.matmul_size;
  j["seq_length"] = config.train.seq_length;
  j["micro_batch_size"] = config.train.micro_batch_size;
  j["global_batch_size"] = config.train.global_batch_size;
  j["recompute"] = config.train.recompute;
  j["attention"] = config::to_string(config.model.attention);
  j["router"] = config::to_string(config.moe.router);
  j["tokens_per_step"] = r.tokens_per_step;
  j["flops_per_token"] = r.flops_per_token;
  j["step_seconds"] = r.step_seconds;
  j["median_step_seconds"] = r.step_median_seconds;
  j["tokens_per_s"] = r.tokens_per_s;
  j["mfu"] = r.mfu;
  j["mfu_measured_peak"] = r.mfu_measured_peak;
  j["mfu_stated_peak"] = r.mfu_stated_peak;
  j["losses"] = r.losses;
  j["forward_seconds"] = r.forward_seconds;
  j["components"] = nlohmann::ordered_json::array();
  for (const auto& c : r.components) j["components"].push_back({{"name", c.name}, {"seconds", c.seconds}});
  j["pairs"] = nlohmann::ordered_json::array();
  for (const auto& p : r.pairs) {
    j["pairs"].push_back({{"name", p.name}, {"a", p.a}, {"b", p.b}, {"a_seconds", p.a_seconds},
                          {"b_seconds", p.b_seconds}, {"ratio_a_over_b", p.a_seconds / p.b_seconds}});
  }
  j["peak_rss_bytes"] = r.peak_rss_bytes;
  j["peak_device_bytes"] = r.peak_device_bytes;
  return j;
}

std::string format_report(const BenchReport& r) {
  std::ostringstream out;
  if (r.attention_kernel) {
    const AttentionKernelTime& a = *r.attention_kernel;
    out << "device " << r.device << ", " << r.threads << " threads, libtorch " << r.torch_version << "\n"
        << a.kernel << " causal attention, [" << a.batch << ", " << a.heads << ", " << a.seq << ", " << a.head_dim
        << "] fp32, forward + backward: " << fixed(a.seconds * 1e3, 2) << " ms (median), peak memory +"
        << fixed(static_cast<double>(a.peak_extra_bytes) / (1 << 20), 1) << " MiB\n";
    return out.str();
  }
  out << "device " << r.device << ", " << r.threads << " threads, libtorch " << r.torch_version
      << ", " << r.matmul_size << "^3 matmul " << fixed(r.measured_peak_flops / 1e9, 1)
      << " GFLOP/s sustained (median; best single run " << fixed(r.best_matmul_flops / 1e9, 1) << ")"
      << (r.peak_flops != r.measured_peak_flops ? ", MFU against the stated " + fixed(r.peak_flops / 1e12, 0) + " TFLOP/s"
                                                : std::string())
      << "\n";
  out << "weights: " << (r.init_from.empty() ? "random (train.seed)" : r.init_from)
      << ", tokens: " << (r.data.empty() ? "random" : r.data) << "\n";
  out << "step: " << r.tokens_per_step << " tokens in " << fixed(r.step_median_seconds * 1e3, 1) << " ms (median of "
      << r.step_seconds.size() << "): " << fixed(r.tokens_per_s, 0) << " tokens/s, MFU "
      << fixed(100.0 * r.mfu, 1) << "%";
  if (r.mfu_stated_peak > 0) out << " (" << fixed(100.0 * r.mfu_measured_peak, 1) << "% of the measured matmul rate)";
  out << "\n";
  if (!r.components.empty()) {
    double total = 0.0;
    for (const auto& c : r.components) total += c.seconds;
    out << "\nper optimizer step                                        ms      share\n";
    for (const auto& c : r.components) {
      std::string name = c.name;
      name.resize(std::max<size_t>(name.size(), 54), ' ');
      out << "  " << name << fixed(c.seconds * 1e3, 1) << "\t" << fixed(100.0 * c.seconds / total, 1) << "%\n";
    }
    out << "  (sum " << fixed(total * 1e3, 1) << " ms vs step " << fixed(r.step_median_seconds * 1e3, 1) << " ms)\n";
  }
  if (!r.pairs.empty()) out << "\nside by side, " << r.precision << (r.precision == "bf16" ? " autocast" : "") << ":\n";
  for (const auto& p : r.pairs) {
    out << "\n" << p.name << ":\n  " << p.a << ": " << fixed(p.a_seconds * 1e3, 2) << " ms\n  " << p.b << ": "
        << fixed(p.b_seconds * 1e3, 2) << " ms\n  ratio " << fixed(p.a_seconds / p.b_seconds, 2) << "\n";
  }
  out << "\npeak resident memory " << fixed(static_cast<double>(r.peak_rss_bytes) / (1 << 20), 0) << " MiB\n";
  if (r.peak_device_bytes > 0) {
    out << "peak CUDA memory allocated " << fixed(static_cast<double>(r.peak_device_bytes) / (1 << 20), 0) << " MiB\n";
  }
  return out.str();
}

}  // namespace yuanmoe::train
