#!/usr/bin/env python3
"""What the expert-parallel all-to-all costs against the experts' own work, per training step, on
this machine over Gloo (docs/parallelism.md, "Expert parallelism, measured").

Trains configs/tiny-m32.json (fp32, micro-batches of 2 so that dp=4 divides the batch) for a few
steps at dp=2 ep=2, dp=4 ep=2 and dp=4 ep=4, one thread per rank, and reads what every rank logs
at the end of the run: milliseconds per step in the all-to-all exchanges (counts, dispatch,
combine; forward and backward, waits for peers included), in the local experts' forward and
backward, and the whole step. Needs data/corpus_* (./scripts/prepare-corpus.sh). With 4 ranks
on a 2-core machine the processes share cores: the figures then include waiting for a core.

usage: python3 bench/expert_parallel_cost.py build/yuanmoe OUT.json [STEPS]
"""

import json
import os
import re
import sys
import tempfile

from tiny_launch import launch_tiny_m32

BIN = os.path.abspath(sys.argv[1])
OUT = sys.argv[2]
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 12
WORK = tempfile.mkdtemp(prefix="yuanmoe-ep-cost-")


def train(run_dir, nproc, ep):
    ranks = []
    for text in launch_tiny_m32(BIN, os.path.join(WORK, run_dir), nproc, STEPS, ["parallel.expert=%d" % ep]):
        m = re.search(r"expert parallelism on rank \d+, per step: all-to-all ([\d.]+) ms, experts forward ([\d.]+) ms "
                      r"\+ backward ([\d.]+) ms, step ([\d.]+) ms", text)
        if m:
            ranks.append(dict(zip(("all_to_all_ms", "experts_forward_ms", "experts_backward_ms", "step_ms"),
                                  map(float, m.groups()))))
    return ranks


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def main():
    results = []
    for nproc, ep in ((2, 2), (4, 2), (4, 4)):
        ranks = train("dp%d_ep%d" % (nproc, ep), nproc, ep)
        row = {"dp": nproc, "ep": ep, "steps": STEPS, "ranks": ranks}
        for key in ("all_to_all_ms", "experts_forward_ms", "experts_backward_ms", "step_ms"):
            row[key] = mean(ranks, key)
        row["all_to_all_over_experts"] = row["all_to_all_ms"] / (row["experts_forward_ms"] + row["experts_backward_ms"])
        results.append(row)
        print("dp=%d ep=%d: all-to-all %.1f ms, experts %.1f + %.1f ms (ratio %.2f), step %.1f ms"
              % (nproc, ep, row["all_to_all_ms"], row["experts_forward_ms"], row["experts_backward_ms"],
                 row["all_to_all_over_experts"], row["step_ms"]), flush=True)
    with open(OUT, "w") as f:
        json.dump({"config": "configs/tiny-m32.json", "micro_batch_size": 2, "backend": "gloo",
                   "cores": os.cpu_count(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
