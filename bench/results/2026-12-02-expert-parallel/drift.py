#!/usr/bin/env python3
"""fp32 against fp64: how far layouts drift from one process over 20 steps of configs/tiny-m32.json
on the default corpus (data/corpus_*), micro-batches of 2. Prints, per precision and layout, the
max |loss difference| from one process, the first step it exceeds 1e-5, and whether every step's
routed-pair counts are equal. usage (repository root): python3 THIS build/yuanmoe OUT.json"""

import json
import os
import subprocess
import sys
import tempfile

BIN, OUT = os.path.abspath(sys.argv[1]), sys.argv[2]
WORK = tempfile.mkdtemp(prefix="yuanmoe-drift-")
LAYOUTS = [("single", 1, 1, False), ("dp2", 2, 1, False), ("dp2_ep2", 2, 2, False), ("dp2_sharded", 2, 1, True)]


def train(name, nproc, ep, shard, precision):
    run_dir = os.path.join(WORK, precision, name)
    args = ["train", "--config", "configs/tiny-m32.json", "--run-dir", run_dir, "--set", "train.micro_batch_size=2",
            "--set", "train.max_steps=20", "--set", "train.eval_interval=0", "--set", "checkpoint.interval=0",
            "--set", "log.progress=false", "--set", "log.plots=false", "--set", "log.peak_tflops=1",
            "--set", "train.precision=" + precision, "--set", "parallel.expert=%d" % ep,
            "--set", "parallel.shard_optimizer=%s" % str(shard).lower()]
    cmd = [BIN, *args] if nproc == 1 else [BIN, "launch", "--nproc", str(nproc), "--", *args]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "split" not in r}


report = {}
for precision in ("fp32", "fp64"):
    runs = {name: train(name, nproc, ep, shard, precision) for name, nproc, ep, shard in LAYOUTS}
    for name in runs:
        if name == "single":
            continue
        diffs = [abs(runs[name][s]["loss"] - runs["single"][s]["loss"]) for s in sorted(runs["single"])]
        first = next((i + 1 for i, d in enumerate(diffs) if d > 1e-5), None)
        counts = all(runs[name][s]["expert_load"] == runs["single"][s]["expert_load"] for s in runs["single"])
        report["%s %s" % (precision, name)] = {"max_diff": max(diffs), "first_step_over_1e-5": first,
                                               "expert_load_equal": counts, "diffs": diffs}
        print("%s %-12s max |diff| %.1e, first step over 1e-5: %s, expert loads equal: %s"
              % (precision, name, max(diffs), first, counts), flush=True)
json.dump(report, open(OUT, "w"), indent=2)
