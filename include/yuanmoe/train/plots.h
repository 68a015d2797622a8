// run_dir/plots/: loss.png (train and valid loss by step) and expert_load.png (layers x experts
// heatmap of the latest logged load), drawn by gnuplot from metrics.jsonl, so they can be redrawn
// at any time, by the trainer as the run goes or by hand (`gnuplot plots/plots.gp`).
#pragma once

#include <filesystem>
#include <string>

namespace yuanmoe::train {

/// Writes plots/*.dat and plots/plots.gp from run_dir/metrics.jsonl and runs gnuplot. Returns an
/// empty string on success, else why no plot was drawn (gnuplot missing or failing); never throws
/// for plotting problems: a missing plotter must not stop a run.
std::string render_plots(const std::filesystem::path& run_dir);

}  // namespace yuanmoe::train
