#include "yuanmoe/train/metrics.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "yuanmoe/core/memory.h"

namespace yuanmoe::train {

namespace {

using ordered_json = nlohmann::ordered_json;

/// A 1-D tensor as a JSON array of doubles rounded to 1e-4 (shares, entropies, counts per token).
ordered_json json_vector(const Tensor& values_L) {
  const Tensor rounded = ((values_L.to(torch::kDouble) * 1e4).round() / 1e4).contiguous();
  return std::vector<double>(rounded.data_ptr<double>(), rounded.data_ptr<double>() + rounded.numel());
}

ordered_json json_rows(const Tensor& values_LE) {
  ordered_json rows = ordered_json::array();
  for (int64_t l = 0; l < values_LE.size(0); ++l) rows.push_back(json_vector(values_LE[l]));
  return rows;
}

}  // namespace

void StepInterval::add(const StepResult& result, double seconds, int64_t tokens) {
  seconds_ += seconds;
  tokens_ += tokens;
  if (result.skipped) ++skipped_steps_;
  if (result.routed_pairs_LE.defined()) {
    routed_pairs_LE_ = routed_pairs_LE_.defined() ? routed_pairs_LE_ + result.routed_pairs_LE : result.routed_pairs_LE;
  }
}

StepInterval::Line StepInterval::take(int64_t step, int64_t max_steps, const StepResult& result, int64_t tokens_seen,
                                      double flops_per_token, double peak_flops, int64_t processes, bool pipelined,
                                      const std::string& eta) {
  const double tokens_per_s = static_cast<double>(tokens_) / seconds_;
  // MFU of the whole run: every process is assumed to have the peak rank 0 measured.
  const double mfu =
      peak_flops > 0 ? tokens_per_s * flops_per_token / (peak_flops * static_cast<double>(processes)) : 0.0;
  Line line;
  line.json = {{"step", step},
               {"loss", result.loss},
               {"aux_loss", result.aux_loss},
               {"lr", result.lr},
               {"grad_norm", result.grad_norm},
               {"tokens_per_s", tokens_per_s},
               {"tokens_seen", tokens_seen}};
  if (result.skipped) line.json["skipped"] = true;
  line.json["skipped_steps"] = skipped_steps_;  // non-finite steps skipped in the interval
  line.json["mfu"] = mfu;
  line.json["peak_rss_mib"] = peak_rss_bytes() / (1024 * 1024);  // the process's, since it started
  if (pipelined) line.json["pipeline_bubble"] = result.pipeline_bubble;
  if (routed_pairs_LE_.defined()) line.json["expert_load"] = json_rows(expert_share(routed_pairs_LE_));
  line.text = fmt::format("step {}/{} | loss {:.4f} | aux {:.4f} | lr {:.3e} | grad_norm {:.3f} | {} tok/s | mfu {:.1f}% | ETA {}",
                          step, max_steps, result.loss, result.aux_loss, result.lr, result.grad_norm,
                          human_count(tokens_per_s), 100.0 * mfu, eta);
  *this = StepInterval();
  return line;
}

ordered_json eval_line(int64_t step, const EvalReport& report) {
  const EvalResult& result = report.headline;
  ordered_json line{{"step", step}, {"split", "valid"}, {"loss", result.loss},
                    {"perplexity", result.perplexity}, {"tokens", result.tokens}};
  if (result.expert_share_LE.defined()) {
    line["expert_load"] = json_rows(result.expert_share_LE);
    // Per MoE layer: mean routing entropy (nats) and routed (token, expert) pairs per token.
    const Tensor routed_tokens_L = report.router_sums.select(1, 1).clamp_min(1.0);
    const Tensor active_experts_L = result.routed_pairs_LE.to(torch::kDouble).sum(1) / routed_tokens_L;
    line["router_entropy"] = json_vector(report.router_sums.select(1, 0) / routed_tokens_L);
    line["active_experts"] = json_vector(active_experts_L);
    // The load's coefficient of variation (population std / mean of the shares), and the experts
    // that got under 1 % of the tokens (share x pairs per token; scripts/ablate.py reads both).
    const Tensor share_LE = result.expert_share_LE;
    line["load_cv"] = json_vector(share_LE.std(1, /*unbiased=*/false) / share_LE.mean(1).clamp_min(1e-300));
    line["experts_under_1pct"] = json_vector((share_LE * active_experts_L.unsqueeze(1) < 0.01).sum(1));
    // Shares of the tokens whose k-th and (k+1)-th routing weights tie (docs/routers.md, "Ties").
    line["router_ties"] = json_vector(report.router_sums.select(1, 2) / routed_tokens_L);
    line["router_exact_ties"] = json_vector(report.router_sums.select(1, 3) / routed_tokens_L);
  }
  if (!report.sources.empty()) {
    ordered_json sources = ordered_json::object();
    for (size_t i = 0; i < report.sources.size(); ++i) {
      const EvalResult& source = report.sources[i];
      sources[report.source_names[i]] = {
          {"loss", source.loss}, {"perplexity", source.perplexity}, {"tokens", source.tokens}};
    }
    line["sources"] = sources;
  }
  return line;
}

std::string eval_text(int64_t step, const EvalReport& report) {
  std::string per_source;
  for (size_t i = 0; i < report.sources.size(); ++i) {
    per_source += fmt::format("{}{} {:.4f}", i ? ", " : " | sources: ", report.source_names[i], report.sources[i].loss);
  }
  return fmt::format("eval step {} | valid loss {:.4f} | perplexity {:.2f} | {} tokens{}", step, report.headline.loss,
                     report.headline.perplexity, report.headline.tokens, per_source);
}

MetricsLog::MetricsLog(std::filesystem::path path, int64_t resume_step) : path_(std::move(path)) {
  std::vector<std::string> kept;
  bool dropped = false;
  {
    std::ifstream in(path_);
    std::string line;
    while (std::getline(in, line)) {
      try {
        const auto j = nlohmann::json::parse(line);
        if (j.value("step", int64_t{0}) <= resume_step) {
          kept.push_back(line);
          continue;
        }
      } catch (const nlohmann::json::exception&) {
        // A torn last line from a killed run: drop it.
      }
      dropped = true;
    }
  }
  if (dropped) {
    // Written aside and renamed: a kill at any moment leaves either the old or the new file,
    // never a truncated one (found by tests/cli/kill_resume.sh).
    const std::filesystem::path tmp = path_.string() + ".tmp";
    {
      std::ofstream rewrite(tmp, std::ios::trunc);
      if (!rewrite) throw std::runtime_error(tmp.string() + ": cannot write metrics file");
      for (const auto& line : kept) rewrite << line << "\n";
      rewrite.flush();
      if (!rewrite) throw std::runtime_error(tmp.string() + ": write failed");
    }
    std::filesystem::rename(tmp, path_);
  }
  out_.open(path_, std::ios::app);
  if (!out_) throw std::runtime_error(path_.string() + ": cannot write metrics file");
}

void MetricsLog::write(const nlohmann::ordered_json& line) {
  out_ << line.dump() << "\n";
  out_.flush();
}

std::string human_count(double value) {
  char text[32];
  if (value >= 1e6) {
    std::snprintf(text, sizeof(text), "%.2fM", value / 1e6);
  } else if (value >= 1e3) {
    std::snprintf(text, sizeof(text), "%.1fk", value / 1e3);
  } else {
    std::snprintf(text, sizeof(text), "%.0f", value);
  }
  return text;
}

std::string human_duration(double seconds) {
  const auto s = static_cast<int64_t>(std::llround(std::max(seconds, 0.0)));
  char text[32];
  if (s >= 3600) {
    std::snprintf(text, sizeof(text), "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>(s % 3600 / 60));
  } else if (s >= 60) {
    std::snprintf(text, sizeof(text), "%lldm%02llds", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  } else {
    std::snprintf(text, sizeof(text), "%llds", static_cast<long long>(s));
  }
  return text;
}

ProgressBar::ProgressBar(int64_t first_step, int64_t last_step, bool enabled)
    : first_step_(first_step), last_step_(last_step), enabled_(enabled && ::isatty(STDERR_FILENO)) {}

std::string ProgressBar::eta(int64_t step) const {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t done = step - first_step_;
  if (done <= 0) return "?";
  return human_duration(elapsed / static_cast<double>(done) * static_cast<double>(last_step_ - step));
}

void ProgressBar::update(int64_t step, double loss, double tokens_per_s) {
  if (!enabled_) return;
  constexpr int kWidth = 30;
  const double fraction = static_cast<double>(step) / static_cast<double>(std::max<int64_t>(last_step_, 1));
  const int filled = static_cast<int>(fraction * kWidth);
  std::ostringstream line;
  line << "\r\033[K" << "step " << step << "/" << last_step_ << " [" << std::string(filled, '#')
       << std::string(kWidth - filled, '.') << "] " << static_cast<int>(fraction * 100) << "% | loss ";
  char number[32];
  std::snprintf(number, sizeof(number), "%.4f", loss);
  line << number << " | " << human_count(tokens_per_s) << " tok/s | ETA " << eta(step);
  std::cerr << line.str() << std::flush;
  drawn_ = true;
}

void ProgressBar::clear() {
  if (enabled_ && drawn_) std::cerr << "\r\033[K" << std::flush;
  drawn_ = false;
}

void ProgressBar::finish() {
  if (enabled_ && drawn_) std::cerr << "\n" << std::flush;
  drawn_ = false;
}

}  // namespace yuanmoe::train
