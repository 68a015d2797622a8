#!/usr/bin/env python3
"""What TensorBoard logging costs a step: configs/tiny-m32.json trained with log.tensorboard on
and off, alternating, ROUNDS rounds of STEPS steps each, in one run of this script. Every step
is logged (log.interval = 1, the worst case) and every 10th step evaluates (the per-layer
scalars and histograms). Plots are off in both, so gnuplot's time is not counted.

Reports the median step time of each setting (from metrics.jsonl's tokens_per_s, the first two
steps of a run left out) and the log's own figure from train.log ("TensorBoard: N lines written
... (X ms per line)").

usage: bench/tensorboard_overhead.py [BINARY] [OUT] [--rounds R] [--steps N]
       (defaults: build/yuanmoe, /tmp/yuanmoe-tensorboard-overhead, 3 rounds, 40 steps; the demo's
        corpus: scripts/prepare-corpus.sh)
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys


def train(binary, run_dir, tensorboard, steps):
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"train.max_steps={steps}", "train.eval_interval=10", "checkpoint.interval=0", "log.interval=1",
            "log.plots=false", "log.progress=false", f"log.tensorboard={'true' if tensorboard else 'false'}"]
    command = [binary, "train", "--config", "configs/tiny-m32.json", "--run-dir", run_dir]
    for s in sets:
        command += ["--set", s]
    p = subprocess.run(command, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {p.returncode}\n{p.stderr[-3000:]}")
    with open("configs/tiny-m32.json") as f:
        config = json.load(f)["train"]
    tokens_per_step = config["global_batch_size"] * config["seq_length"]
    step_seconds = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "tokens_per_s" in record and record["step"] > 2:  # a train line
                step_seconds.append(tokens_per_step / record["tokens_per_s"])
    per_line_ms = None
    with open(os.path.join(run_dir, "train.log")) as f:
        for line in f:
            m = re.search(r"TensorBoard: (\d+) lines written to .* in ([0-9.]+) ms \(([0-9.]+) ms per line\)", line)
            if m:
                per_line_ms = (int(m.group(1)), float(m.group(2)), float(m.group(3)))
    return statistics.median(step_seconds), per_line_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?", default="build/yuanmoe")
    ap.add_argument("out", nargs="?", default="/tmp/yuanmoe-tensorboard-overhead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    times = {True: [], False: []}
    lines = []
    for r in range(args.rounds):
        for tensorboard in (True, False):
            seconds, per_line = train(args.binary, os.path.join(args.out, f"{'on' if tensorboard else 'off'}_{r}"),
                                      tensorboard, args.steps)
            times[tensorboard].append(seconds)
            if per_line:
                lines.append(per_line)
            print(f"round {r + 1}, tensorboard {'on ' if tensorboard else 'off'}: median step {1e3 * seconds:.1f} ms",
                  file=sys.stderr)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print("| log.tensorboard | median step (ms), each round | median |")
    print("|---|---|---|")
    for setting, label in ((True, "true"), (False, "false")):
        print(f"| {label} | {', '.join(f'{1e3 * t:.1f}' for t in times[setting])} | {1e3 * statistics.median(times[setting]):.1f} |")
    print(f"\non / off: {on / off:.3f}")
    if lines:
        n, ms, per = lines[-1]
        per_line = statistics.median(l[2] for l in lines)
        print(f"the log's own time: {n} lines in {ms:.1f} ms in the last round; median {per_line:.3f} ms per line, "
              f"{100 * per_line / (1e3 * on):.4f} % of a step")


if __name__ == "__main__":
    main()
