#!/usr/bin/env python3
"""The data-parallel gradient reduction left after the backward, per training step, with and
without parallel.overlap_grad_reduce, over Gloo on this machine (docs/parallelism.md, "Gradient
reduction").

Trains configs/tiny-m32.json (fp32, micro-batches of 2 so that dp=4 divides the batch of 8) at
dp=2 and dp=4, overlap on and off alternating for ROUNDS rounds, one thread per rank, and reads
what every rank logs at the end of its run: the milliseconds per step that reducing the gradients
took after the backward (waiting for the collectives the backward did not hide, and the
division; the first step, which sets up buffers, left out) and the step. Needs data/corpus_*
(./scripts/prepare-corpus.sh). With 4 ranks on a 2-core machine the processes share cores:
Gloo's threads then compete with the backward for them.

usage: python3 bench/grad_reduce_overlap.py build/yuanmoe OUT.json [STEPS] [ROUNDS]
"""

import json
import os
import re
import statistics
import sys
import tempfile

from tiny_launch import launch_tiny_m32

BIN = os.path.abspath(sys.argv[1])
OUT = sys.argv[2]
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
WORK = tempfile.mkdtemp(prefix="yuanmoe-overlap-")
LINE = re.compile(r"gradient reduction on rank (\d+), per step: ([\d.]+) ms after the backward, ([\d.]+) ms of it "
                  r"waiting for collectives \(overlap (on|off)\), step ([\d.]+) ms")


def train(run_dir, nproc, overlap, extra):
    overrides = ["log.interval=1", "parallel.overlap_grad_reduce=%s" % ("true" if overlap else "false"), *extra]
    ranks = []
    for rank, text in enumerate(launch_tiny_m32(BIN, os.path.join(WORK, run_dir), nproc, STEPS, overrides)):
        m = LINE.search(text)
        if not m:
            raise SystemExit("%s rank %d: no gradient reduction line" % (run_dir, rank))
        ranks.append({"reduction_ms": float(m.group(2)), "waiting_ms": float(m.group(3)), "step_ms": float(m.group(5))})
    losses = [json.loads(line)["loss"] for line in open(os.path.join(WORK, run_dir, "metrics.jsonl"))
              if '"loss"' in line and '"split"' not in line]
    return ranks, losses


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def main():
    layouts = [("dp=2", 2, []), ("dp=2 sharded", 2, ["parallel.shard_optimizer=true"]), ("dp=4", 4, [])]
    results = []
    for name, nproc, extra in layouts:
        runs = {True: [], False: []}
        losses = {}
        for r in range(ROUNDS):
            for overlap in (True, False) if r % 2 == 0 else (False, True):
                ranks, loss = train("%s_%s_%d" % (name.replace(" ", "_").replace("=", ""), overlap, r), nproc, overlap,
                                    extra)
                runs[overlap].append({"ranks": ranks, "reduction_ms": mean(ranks, "reduction_ms"),
                                      "waiting_ms": mean(ranks, "waiting_ms"), "step_ms": mean(ranks, "step_ms")})
                losses.setdefault(overlap, loss)
                print("%s overlap %s round %d: reduction after backward %.1f ms (waiting %.1f), step %.1f ms"
                      % (name, "on" if overlap else "off", r + 1, runs[overlap][-1]["reduction_ms"],
                         runs[overlap][-1]["waiting_ms"], runs[overlap][-1]["step_ms"]), flush=True)
        row = {"layout": name, "ranks": nproc, "steps": STEPS, "rounds": ROUNDS,
               "same_losses": losses[True] == losses[False], "runs": {"on": runs[True], "off": runs[False]}}
        for key, overlap in (("on", True), ("off", False)):
            row[key + "_reduction_ms"] = statistics.median(x["reduction_ms"] for x in runs[overlap])
            row[key + "_waiting_ms"] = statistics.median(x["waiting_ms"] for x in runs[overlap])
            row[key + "_step_ms"] = statistics.median(x["step_ms"] for x in runs[overlap])
        results.append(row)
        print("%s: reduction after backward %.1f ms (on, waiting %.1f) vs %.1f ms (off, waiting %.1f); step %.1f vs "
              "%.1f ms; losses %s"
              % (name, row["on_reduction_ms"], row["on_waiting_ms"], row["off_reduction_ms"], row["off_waiting_ms"],
                 row["on_step_ms"], row["off_step_ms"],
                 "bit-identical" if row["same_losses"] else "DIFFER"), flush=True)
    with open(OUT, "w") as f:
        json.dump({"config": "configs/tiny-m32.json", "micro_batch_size": 2, "backend": "gloo",
                   "cores": os.cpu_count(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
