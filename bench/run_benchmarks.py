#!/usr/bin/env python3
"""Regenerates the tables of docs/benchmarks.md (between its markers) from one run on this machine.

  1. `yuanmoe bench` on configs/tiny-m32.json: step tokens/s, MFU against the matmul peak measured
     in the same process, the per-component breakdown, MoE block vs dense FFN and blockwise vs
     materialised attention (each pair interleaved A B A B inside the process).
  2. Our training step vs the eager PyTorch reference (bench/pytorch_eager_step.py: the model of
     tests/reference/yuan2_reference.py with an AdamW step), same config, threads and batch,
     alternating processes A B A B ... so that machine drift hits both; ratio of median tokens/s.
  3. Peak resident memory of one training step vs sequence length (micro-batch 1, recompute),
     blockwise attention against materialised S x S scores, one process per point.

usage: python3 bench/run_benchmarks.py [--yuanmoe build/yuanmoe] [--rounds 3]
                                                 [--out docs/benchmarks.md] [--quick]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny-m32.json"


def run_json(cmd, json_path, env=None):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=sys.stderr)
    with open(json_path) as f:
        return json.load(f)


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    blas = "unknown"
    try:
        out = subprocess.run(["update-alternatives", "--query", "libblas.so.3-x86_64-linux-gnu"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Value:"):
                blas = line.split(":", 1)[1].strip()
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "blas": blas,
            "kernel": platform.release()}


def ms(seconds):
    return "%.1f" % (seconds * 1e3)


def mib(nbytes):
    return "%.0f" % (nbytes / 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yuanmoe", default="build/yuanmoe")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of ours vs PyTorch eager")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--work", default="runs/bench", help="where the JSON of every run goes")
    ap.add_argument("--quick", action="store_true", help="smaller sequence sweep (to try the script)")
    args = ap.parse_args()
    work = os.path.join(ROOT, args.work)
    os.makedirs(work, exist_ok=True)
    threads = os.cpu_count()
    yuanmoe = os.path.join(ROOT, args.yuanmoe)

    # 1. The breakdown.
    full = run_json([yuanmoe, "bench", "--config", CONFIG, "--steps", "5", "--warmup", "1",
                     "--json", os.path.join(work, "tiny.json")], os.path.join(work, "tiny.json"))

    # 2. Ours vs PyTorch eager, alternating processes. The eager run gets the same malloc tuning that
    # `yuanmoe` applies to itself at start-up (main.cpp), so the comparison is of the step, not of
    # glibc's defaults.
    eager_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="4294967296")
    ours, eager = [], []
    for r in range(args.rounds):
        path = os.path.join(work, "ours_%d.json" % r)
        ours.append(run_json([yuanmoe, "bench", "--config", CONFIG, "--step-only", "--steps", "3",
                              "--warmup", "1", "--json", path], path))
        path = os.path.join(work, "eager_%d.json" % r)
        eager.append(run_json([sys.executable, "bench/pytorch_eager_step.py", "--config", CONFIG,
                               "--steps", "3", "--warmup", "1", "--threads", str(threads), "--json", path],
                              path, env=eager_env))
    ours_tps = statistics.median(o["tokens_per_s"] for o in ours)
    eager_tps = statistics.median(e["tokens_per_s"] for e in eager)

    # The MoE block's cost per router: the same pairs with the classic linear top-k router.
    path = os.path.join(work, "tiny_linear.json")
    linear = run_json([yuanmoe, "bench", "--config", CONFIG, "--set", "moe.router=linear", "--steps", "2",
                       "--warmup", "1", "--json", path], path)

    # 3. Memory vs sequence length.
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    memory = []
    for seq in lengths:
        for block in (512, 0):
            if block == 0 and seq > 4096:
                continue  # 16K x 16K fp32 scores are 4 GiB per head-batch: not run on this machine
            path = os.path.join(work, "memory_%d_%d.json" % (seq, block))
            res = run_json([yuanmoe, "bench", "--config", CONFIG, "--step-only", "--steps", "1", "--warmup", "0",
                            "--set", "model.max_seq_length=%d" % seq, "--set", "train.seq_length=%d" % seq,
                            "--set", "train.micro_batch_size=1", "--set", "train.global_batch_size=1",
                            "--set", "train.recompute=true", "--set", "model.attention_block_size=%d" % block,
                            "--json", path], path)
            memory.append((seq, block, res))

    write_doc(args.out, machine(), full, linear, ours, eager, ours_tps, eager_tps, memory, threads)
    print("wrote " + args.out, file=sys.stderr)
    return 0


def write_doc(out, m, full, linear, ours, eager, ours_tps, eager_tps, memory, threads):
    lines = []
    add = lines.append
    add("# Benchmarks")
    add("")
    add("Generated by `/usr/bin/python3 bench/run_benchmarks.py` on %s; do not edit by hand. Every figure"
        % datetime.date.today().isoformat())
    add("comes from that one run: ratios are of measurements taken side by side, never across runs.")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    add("| CPU | %s, %d cores, %.0f GiB |" % (m["cpu"], m["cores"], m["memory_gib"]))
    add("| BLAS | `%s` |" % m["blas"])
    add("| libtorch | %s, %d intra-op threads |" % (full["torch_version"], full["threads"]))
    add("| matmul peak | %.1f GFLOP/s sustained: fp32 2048^3, median of 9 runs, the higher of before and after the steps, "
        "in the bench process (fastest single run: %.1f GFLOP/s) |" % (full["peak_flops"] / 1e9, full["best_matmul_flops"] / 1e9))
    add("")
    add("## Training step, `configs/tiny-m32.json`")
    add("")
    add("`build/yuanmoe bench --config configs/tiny-m32.json` (random tokens; the trainer's step:")
    add("%d micro-batches of %d x %d tokens, clip, AdamW)." % (
        full["global_batch_size"] // full["micro_batch_size"], full["micro_batch_size"], full["seq_length"]))
    add("")
    add("| tokens / step | median step | tokens/s | model FLOPs / token | MFU |")
    add("|---|---|---|---|---|")
    add("| %d | %s ms | %.0f | %.1f M | %.1f %% (%.1f %% of the fastest single run) |" % (
        full["tokens_per_step"], ms(full["median_step_seconds"]), full["tokens_per_s"], full["flops_per_token"] / 1e6,
        100 * full["mfu"], 100 * full["mfu"] * full["peak_flops"] / full["best_matmul_flops"]))
    add("")
    add("MFU counts model FLOPs only (3 x forward, `src/train/mfu.cpp`; attention over the causal half,")
    add("as llm.c counts it; recomputation not at all).")
    add("")
    add("### Where the step goes")
    add("")
    add("Each forward part timed alone on one micro-batch (layer 0, autograd recording), scaled to one")
    add("optimizer step; backward is the step's forward + backward minus its forward.")
    add("")
    add("| part | ms / step | share |")
    add("|---|---|---|")
    total = sum(c["seconds"] for c in full["components"])
    for c in full["components"]:
        add("| %s | %s | %.1f %% |" % (c["name"], ms(c["seconds"]), 100 * c["seconds"] / total))
    add("| **sum** (vs measured step %s ms) | %s | |" % (ms(full["median_step_seconds"]), ms(total)))
    add("")
    add("### Side by side in one process (forward + backward, medians of interleaved runs)")
    add("")
    add("| comparison | A | B | A ms | B ms | A / B |")
    add("|---|---|---|---|---|---|")
    for p in full["pairs"]:
        add("| %s | %s | %s | %.2f | %.2f | %.2f |" % (p["name"], p["a"], p["b"], p["a_seconds"] * 1e3,
                                                     p["b_seconds"] * 1e3, p["ratio_a_over_b"]))
    add("")
    add("The same pairs with `--set moe.router=linear` (classic top-k softmax router), separate process:")
    add("")
    add("| comparison | A ms | B ms | A / B |")
    add("|---|---|---|---|")
    for p in linear["pairs"]:
        if "router" in p["name"] or "MoE block" in p["name"]:
            add("| %s: %s | %.2f | %.2f | %.2f |" % (p["name"], p["a"], p["a_seconds"] * 1e3, p["b_seconds"] * 1e3,
                                                   p["ratio_a_over_b"]))
    add("")
    add("## Against the eager PyTorch reference")
    add("")
    add("Same config, batch (%d tokens per step) and %d threads; the eager side is" % (full["tokens_per_step"], threads))
    add("`bench/pytorch_eager_step.py`: `tests/reference/yuan2_reference.py` (the HF modeling code's")
    add("math, per-expert loops) with cross-entropy, gradient clipping and `torch.optim.AdamW`, on")
    add("Debian's python3-torch %s (the same libtorch), with the malloc settings `yuanmoe` applies to"
        % (eager[0]["torch_version"] if eager else "?"))
    add("itself. The processes alternate, %d rounds; 3 timed steps each after 1 warm-up." % len(ours))
    add("")
    add("| round | yuanmoe tokens/s | PyTorch eager tokens/s |")
    add("|---|---|---|")
    for i, (o, e) in enumerate(zip(ours, eager)):
        add("| %d | %.0f | %.0f |" % (i + 1, o["tokens_per_s"], e["tokens_per_s"]))
    add("| **median** | **%.0f** | **%.0f** |" % (ours_tps, eager_tps))
    add("")
    add("yuanmoe / eager = **%.2fx**." % (ours_tps / eager_tps))
    add("")
    add("## Memory vs sequence length")
    add("")
    add("One training step of tiny-m32 at micro-batch 1 with `train.recompute`, one process per row;")
    add("peak resident set of the whole process (model, AdamW state, allocator caches included).")
    add("")
    add("| tokens | attention | peak RSS MiB | first step s | tokens/s |")
    add("|---|---|---|---|---|")
    for seq, block, r in memory:
        add("| %d | %s | %s | %.1f | %.0f |" % (seq, "blockwise (512)" if block else "materialised S x S",
                                               mib(r["peak_rss_bytes"]), r["median_step_seconds"], r["tokens_per_s"]))
    add("")
    add("Materialised attention at 16K is not run: its fp32 scores alone are 4 heads x 16K x 16K x 4 B = 4 GiB,")
    add("twice that with the softmax output kept for backward.")
    add("")
    # The tables go between the markers; the hand-written analysis around them stays.
    begin, end = "<!-- generated by bench/run_benchmarks.py: begin -->", "<!-- generated: end -->"
    path = os.path.join(ROOT, out)
    head, tail = "", "\n"
    if os.path.exists(path):
        text = open(path).read()
        if begin in text and end in text:
            head, tail = text[:text.index(begin)], text[text.index(end) + len(end):]
    with open(path, "w") as f:
        f.write(head + begin + "\n" + "\n".join(lines[2:]) + "\n" + end + tail)


if __name__ == "__main__":
    sys.exit(main())
