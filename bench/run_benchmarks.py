#!/usr/bin/env python3
"""Regenerates the tables of docs/benchmarks.md (between its markers) from one run on this machine.

  1. `yuanmoe bench` on configs/tiny-m32.json: step tokens/s, MFU against the matmul peak measured
     in the same process, the per-component breakdown, MoE block vs dense FFN and SDPA vs
     materialised attention (each pair interleaved A B A B inside the process).
  2. Our training step vs the eager PyTorch reference (bench/pytorch_eager_step.py: the model of
     tests/reference/yuan2_reference.py with an AdamW step), same config, threads and batch,
     alternating processes A B A B ... so that machine drift hits both; ratio of median tokens/s.
  3. Peak resident memory of one training step vs sequence length (micro-batch 1, recompute),
     per attention kernel, one process per point.
  4. The causal attention kernels alone (the fused path of model.attention = sdpa, materialised S x S) at
     256 to 16K tokens: forward + backward and the memory each adds, one process per kernel and
     length, kernels alternating.
  5. With --finetune-from CHECKPOINT: the 16K fine-tune step of configs/tiny-m32-1k-finetune.json
     from those trained weights against the same step from random weights, alternating.
  6. With --compare-binary PATH: `yuanmoe bench` of another build (e.g. the tree before the move to
     libtorch 2.11, built against Debian's 1.13) against this one, alternating processes.

usage: python3 bench/run_benchmarks.py [--yuanmoe build/yuanmoe] [--rounds 3] [--out docs/benchmarks.md]
           [--quick] [--finetune-from runs/tiny-m32] [--compare-binary OLD/yuanmoe --compare-label "libtorch 1.13"]
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
FINETUNE_CONFIG = "configs/tiny-m32-1k-finetune.json"


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
    # libtorch's own BLAS (the PyPI wheel links MKL statically): what this interpreter's torch reports.
    blas = "unknown"
    try:
        import torch
        for line in torch.__config__.show().splitlines():
            if "Math Kernel Library" in line or "OpenBLAS" in line:
                blas = line.strip(" -")
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "blas": blas,
            "kernel": platform.release(), "vector": vector_units()}


def vector_units():
    """The CPU's widest vector instructions and family, which pick yuanmoe's own CPU kernels
    (include/yuanmoe/core/small_gemm.h: AVX-512, else AVX2, else at::mm_out) and ATen's."""
    flags, family = set(), "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("cpu family") and family == "?":
                    family = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma"} <= flags else "neither AVX-512 nor AVX2"
    return "%s (cpu family %s)" % (isa, family)


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
    ap.add_argument("--finetune-from", help="checkpoint of configs/tiny-m32.json (the demo's run) for section 5")
    ap.add_argument("--compare-binary", help="another yuanmoe binary to time against this one (section 6)")
    ap.add_argument("--compare-label", default="other build")
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

    # 3. Memory vs sequence length, per attention kernel.
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    memory = []
    for seq in lengths:
        for kernel in ("sdpa", "materialised"):
            if kernel == "materialised" and seq > 4096:
                continue  # 16K x 16K fp32 scores are 4 GiB per head-batch: not run on this machine
            path = os.path.join(work, "memory_%d_%s.json" % (seq, kernel))
            res = run_json([yuanmoe, "bench", "--config", CONFIG, "--step-only", "--steps", "1", "--warmup", "0",
                            "--set", "model.max_seq_length=%d" % seq, "--set", "train.seq_length=%d" % seq,
                            "--set", "train.micro_batch_size=1", "--set", "train.global_batch_size=1",
                            "--set", "train.recompute=true", "--set", "model.attention=" + kernel,
                            "--json", path], path)
            memory.append((seq, kernel, res))

    # 4. The attention kernels alone, alternating processes.
    kernels = {}
    for seq in ([256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]):
        for r in range(2):
            for kernel in ("sdpa", "materialised"):
                if kernel == "materialised" and seq > 4096:
                    continue
                path = os.path.join(work, "attention_%d_%s_%d.json" % (seq, kernel, r))
                res = run_json([yuanmoe, "bench", "--config", CONFIG, "--attention-kernel", kernel,
                                "--repeats", "3" if seq > 4096 else "7",
                                "--set", "model.max_seq_length=%d" % seq, "--set", "train.seq_length=%d" % seq,
                                "--set", "train.micro_batch_size=1", "--json", path], path)
                kernels.setdefault((seq, kernel), []).append(res["attention_kernel"])

    # 5. The 16K fine-tune step from trained weights vs random ones.
    finetune = []
    if args.finetune_from:
        seq = 4096 if args.quick else 16384
        for r in range(1 if not args.quick else 1):
            for init in (args.finetune_from, ""):
                path = os.path.join(work, "finetune_%s_%d.json" % ("trained" if init else "random", r))
                res = run_json([yuanmoe, "bench", "--config", FINETUNE_CONFIG, "--step-only", "--steps", "1",
                                "--warmup", "0", "--set", "train.seq_length=%d" % seq,
                                "--set", "model.max_seq_length=%d" % seq, "--set", "train.init_from=" + init,
                                "--json", path], path)
                finetune.append(res)

    # 6. Another build of the step, alternating with this one.
    compare = []
    if args.compare_binary:
        for r in range(args.rounds):
            for label, binary in ((args.compare_label, args.compare_binary), ("this build", yuanmoe)):
                path = os.path.join(work, "compare_%d_%s.json" % (r, "other" if binary != yuanmoe else "this"))
                res = run_json([binary, "bench", "--config", CONFIG, "--step-only", "--steps", "3", "--warmup", "1",
                                "--json", path], path)
                compare.append((label, res))

    write_doc(args.out, machine(), full, linear, ours, eager, ours_tps, eager_tps, memory, threads, kernels,
              finetune, compare)
    print("wrote " + args.out, file=sys.stderr)
    return 0


def write_doc(out, m, full, linear, ours, eager, ours_tps, eager_tps, memory, threads, kernels, finetune, compare):
    lines = []
    add = lines.append
    add("# Benchmarks")
    add("")
    add("Generated by `bench/run_benchmarks.py` (the project's environment) on %s; do not edit by hand. Every figure"
        % datetime.date.today().isoformat())
    add("comes from that one run: ratios are of measurements taken side by side, never across runs.")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    add("| CPU | %s, %d cores, %.0f GiB |" % (m["cpu"], m["cores"], m["memory_gib"]))
    add("| vector instructions | %s: yuanmoe's small-product kernels run with these |" % m["vector"])
    add("| BLAS | %s |" % m["blas"])
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
    add("PyTorch %s from the project's environment (the same libtorch), with the malloc settings `yuanmoe` applies to"
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
    add("| tokens | attention | peak RSS MiB | step s | tokens/s |")
    add("|---|---|---|---|---|")
    for seq, kernel, r in memory:
        add("| %d | %s | %s | %.1f | %.0f |" % (seq, kernel, mib(r["peak_rss_bytes"]), r["median_step_seconds"],
                                               r["tokens_per_s"]))
    add("")
    add("Materialised attention at 16K is not run: its fp32 scores alone are 4 heads x 16K x 16K x 4 B = 4 GiB,")
    add("twice that with the softmax output kept for backward.")
    add("")
    add("## Attention kernels alone")
    add("")
    add("`yuanmoe bench --attention-kernel K`: causal attention of one micro-batch of tiny-m32's shape")
    add("(1 x 4 heads x S x 128, fp32), forward + backward, median of repeats; memory is the peak resident")
    add("set the kernel adds above its inputs. One process per kernel and length, the kernels")
    add("alternating, 2 rounds; the table gives the median over rounds and the ratio to SDPA. `sdpa` is")
    add("the fused path `model.attention = sdpa` runs: on the CPU our kernel up to 1,024 tokens")
    add("(src/model/attention_cpu.cpp), libtorch's CPU flash kernel beyond.")
    add("")
    add("| tokens | kernel | fwd+bwd ms | / SDPA | peak memory added MiB |")
    add("|---|---|---|---|---|")
    for (seq, kernel), runs in sorted(kernels.items(), key=lambda kv: (kv[0][0], kv[0][1] != "sdpa", kv[0][1])):
        t = statistics.median(a["seconds"] for a in runs)
        sdpa = statistics.median(a["seconds"] for a in kernels[(seq, "sdpa")])
        add("| %d | %s | %.1f | %.2f | %s |" % (seq, kernel, t * 1e3, t / sdpa,
                                                mib(max(a["peak_extra_bytes"] for a in runs))))
    add("")
    if finetune:
        add("## 16K fine-tune step: trained weights vs random")
        add("")
        add("`yuanmoe bench --config %s --step-only --steps 1 --warmup 0 --set train.seq_length=%d`" % (
            FINETUNE_CONFIG, finetune[0]["seq_length"]))
        add("with `train.init_from` set to the demo's checkpoint and empty, alternating: %d micro-batches of %d"
            % (finetune[0]["global_batch_size"] // finetune[0]["micro_batch_size"], finetune[0]["seq_length"]))
        add("tokens, recompute on.")
        add("")
        add("| weights | step s | tokens/s | peak RSS MiB |")
        add("|---|---|---|---|")
        for r in finetune:
            add("| %s | %.1f | %.0f | %s |" % (r["init_from"] or "random (train.seed)", r["median_step_seconds"],
                                             r["tokens_per_s"], mib(r["peak_rss_bytes"])))
        trained = [r for r in finetune if r["init_from"]]
        random = [r for r in finetune if not r["init_from"]]
        if trained and random:
            t = statistics.median(r["median_step_seconds"] for r in trained)
            u = statistics.median(r["median_step_seconds"] for r in random)
            mt = max(r["peak_rss_bytes"] for r in trained)
            mu = max(r["peak_rss_bytes"] for r in random)
            add("")
            add("trained / random: step time **%.2fx**, peak memory **%.2fx**." % (t / u, mt / mu))
        add("")
    if compare:
        add("## Builds side by side")
        add("")
        add("`yuanmoe bench --config %s --step-only --steps 3 --warmup 1`, the two binaries alternating, %d rounds;"
            % (CONFIG, len(compare) // 2))
        add("MFU of each against the matmul peak its own libtorch reaches in the same process.")
        add("")
        add("| build | libtorch | tokens/s | MFU | matmul peak GFLOP/s |")
        add("|---|---|---|---|---|")
        labels = []
        for label, _ in compare:
            if label not in labels:
                labels.append(label)
        medians = {}
        for label in labels:
            runs = [r for l, r in compare if l == label]
            medians[label] = statistics.median(r["tokens_per_s"] for r in runs)
            add("| %s | %s | %.0f | %.1f %% | %.1f |" % (
                label, runs[0]["torch_version"], medians[label],
                100 * statistics.median(r["mfu"] for r in runs),
                statistics.median(r["peak_flops"] for r in runs) / 1e9))
        add("")
        add("%s / %s = **%.2fx** tokens/s." % (labels[-1], labels[0], medians[labels[-1]] / medians[labels[0]]))
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
