#!/usr/bin/env python3
"""Pipeline bubble on this machine: tiny-m32 at pp=2 (`yuanmoe launch`, one intra-op thread per
process), micro-batch 1, m = 2, 4, 8 micro-batches per step, 1F1B, against one process.

The bubble is measured inside the schedule: each stage's time blocked on the other stage
(receives and outstanding sends) over its time in the schedule, averaged over the stages
(`pipeline_bubble` in metrics.jsonl). The 1F1B formula (docs/parallelism.md) is
(p - 1) / (m + p - 1) for equal stages. tiny-m32's last stage also holds the 8192-way head
(about 1.6 layers of work), so pp=2 runs twice: layers 2 + 2 and 3 + 1
(parallel.last_stage_layers = 1). Step times include what the schedule does not: the optimizer
step, the loss and expert-load reductions.

usage: python3 bench/pipeline_bubble.py BUILD_DIR/yuanmoe [--steps 12]
(needs data/brown_* from scripts/demo.sh, or scripts/get-corpus.sh + prepare-data)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def medians(run_dir, tokens_per_step, skip):
    times, bubbles = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "split" not in record and record["step"] > skip:
                times.append(tokens_per_step / record["tokens_per_s"])
                bubbles.append(record.get("pipeline_bubble", 0.0))
    return statistics.median(times), statistics.median(bubbles)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--config", default="configs/tiny-m32.json")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="yuanmoe-bubble-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for m in (2, 4, 8):
        result = {}
        for pp, last_layers in ((1, 0), (2, 0), (2, 1)):
            run_dir = os.path.join(work, "m%d_pp%d_last%d" % (m, pp, last_layers))
            train = ["train", "--config", args.config, "--run-dir", run_dir,
                     "--set", "train.max_steps=%d" % args.steps, "--set", "train.micro_batch_size=1",
                     "--set", "train.global_batch_size=%d" % m, "--set", "train.eval_interval=0",
                     "--set", "data.valid_prefix=", "--set", "checkpoint.interval=0", "--set", "log.interval=1",
                     "--set", "log.progress=false", "--set", "log.plots=false", "--set", "log.peak_tflops=1",
                     "--set", "parallel.pipeline_parallel_size=%d" % pp,
                     "--set", "parallel.last_stage_layers=%d" % last_layers]
            command = [binary, *train] if pp == 1 else [binary, "launch", "--nproc", "2", "--", *train]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result[(pp, last_layers)] = medians(run_dir, m * 256, skip=2)
        (t1, _), (t22, b22), (t31, b31) = result[(1, 0)], result[(2, 0)], result[(2, 1)]
        rows.append((m, t1, t22, t1 / t22, b22, t31, t1 / t31, b31, 1 / (m + 1)))
        print("m=%d: 1 process %.3f s | pp=2 2+2 %.3f s (x%.2f), bubble %.3f | pp=2 3+1 %.3f s (x%.2f), bubble %.3f "
              "| 1F1B formula %.3f" % rows[-1], flush=True)
    print("\n| m | 1 process (s) | pp=2, 2+2 layers (s) | speed-up | bubble | pp=2, 3+1 layers (s) | speed-up "
          "| bubble | 1F1B (p-1)/(m+p-1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| %d | %.3f | %.3f | %.2f | %.3f | %.3f | %.2f | %.3f | %.3f |" % row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
