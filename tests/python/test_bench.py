#!/usr/bin/env python3
"""`yuanmoe bench` and the eager PyTorch step bench on a small model: the JSON holds every figure
docs/benchmarks.md tables (bench/run_benchmarks.py reads it), the figures agree with each other
(tokens/s = tokens per step / median step, MFU = tokens/s x FLOPs per token / peak), the
breakdown names every part of the step and accounts for it, a profiled step's parallel regions
hold every thread's GEMMs, and bad input fails in one line.
Timings are never compared with thresholds here: only their consistency.

usage: python3 test_bench.py BUILD_DIR/yuanmoe
"""

import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from harness import Checks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.abspath(sys.argv[1])
WORK = tempfile.mkdtemp(prefix="yuanmoe-bench-")
check = Checks()
SMALL = ["--set", "model.num_layers=2", "--set", "model.max_seq_length=64", "--set", "train.seq_length=64",
         "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)


# --- yuanmoe bench -----------------------------------------------------------------------------
out = os.path.join(WORK, "bench.json")
p = run([BIN, "bench", "--config", "configs/tiny-m32.json"] + SMALL +
        ["--steps", "2", "--warmup", "1", "--repeats", "3", "--json", out])
check(p.returncode == 0, "bench exits 0 (%s)" % p.stderr.strip()[-300:])
r = json.load(open(out))
for key in ("device", "threads", "peak_flops", "tokens_per_step", "step_seconds", "median_step_seconds",
            "tokens_per_s", "mfu", "flops_per_token", "losses", "components", "pairs", "peak_rss_bytes"):
    check(key in r, "JSON has %s" % key)
check(r["tokens_per_step"] == 4 * 64, "tokens per step = global batch x seq (%d)" % r["tokens_per_step"])
check(len(r["step_seconds"]) == 2 and len(r["losses"]) == 3, "2 timed steps, 3 losses with the warm-up")
check(math.isclose(r["tokens_per_s"], r["tokens_per_step"] / r["median_step_seconds"], rel_tol=1e-9),
      "tokens/s = tokens per step / median step")
check(math.isclose(r["mfu"], r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"], rel_tol=1e-9),
      "MFU = tokens/s x FLOPs per token / peak")
check(r.get("matmul_size") == 2048 and r.get("precision") == "fp32",
      "peak from 2048^3 fp32 products on the CPU (%s, %s)" % (r.get("matmul_size"), r.get("precision")))
check(math.isclose(r.get("mfu_measured_peak", 0), r["tokens_per_s"] * r["flops_per_token"] / r["measured_peak_flops"],
                   rel_tol=1e-9) and r.get("mfu_stated_peak") == 0,
      "MFU against the measured matmul rate; none against an unset log.peak_tflops")
check(abs(r["losses"][0] - math.log(8192)) < 0.5, "first loss %.3f near ln(8192)" % r["losses"][0])
check(all(math.isfinite(x) for x in r["losses"]), "losses finite")
names = [c["name"] for c in r["components"]]
for part in ("embedding", "LFA", "projections", "attention core", "router", "dispatch", "experts", "combine",
             "head + loss", "backward", "optimizer"):
    check(any(part in n for n in names), "breakdown has a %s row" % part)
check(all(c["seconds"] >= 0 for c in r["components"]), "no negative component time")
total = sum(c["seconds"] for c in r["components"])
check(0.4 < total / r["median_step_seconds"] < 2.5,
      "breakdown sum %.1f ms accounts for the step %.1f ms" % (total * 1e3, r["median_step_seconds"] * 1e3))
pairs = {pp["name"].split(" (")[0]: pp for pp in r["pairs"]}
check(any(n.startswith("MoE block vs dense") for n in pairs), "MoE vs dense pair present")
check(any(n.startswith("causal attention core") for n in pairs), "attention pair present")
check("causal attention core on the CPU" in pairs, "on the CPU, our attention kernel against libtorch's SDPA")
check(all(pp["a_seconds"] > 0 and pp["b_seconds"] > 0 and
          math.isclose(pp["ratio_a_over_b"], pp["a_seconds"] / pp["b_seconds"], rel_tol=1e-9) for pp in r["pairs"]),
      "pair ratios are A / B")
check(r["peak_rss_bytes"] > 50 * 2**20, "peak RSS reported (%d MiB)" % (r["peak_rss_bytes"] >> 20))

p = run([BIN, "bench", "--config", "configs/tiny-m32.json"] + SMALL + ["--step-only", "--steps", "1", "--warmup", "0",
                                                                       "--set", "log.peak_tflops=2", "--json", out])
r = json.load(open(out))
check(p.returncode == 0 and r["components"] == [] and r["pairs"] == [], "--step-only skips the breakdown")
model_flops = r["tokens_per_s"] * r["flops_per_token"]
check(r["peak_flops"] == 2e12 and math.isclose(r["mfu"], model_flops / 2e12, rel_tol=1e-9)
      and math.isclose(r["mfu_stated_peak"], r["mfu"], rel_tol=1e-9)
      and math.isclose(r["mfu_measured_peak"], model_flops / r["measured_peak_flops"], rel_tol=1e-9),
      "log.peak_tflops: MFU against it and against the measured rate, both")

# --- one attention kernel alone ---
for kernel in ("sdpa", "materialised"):
    p = run([BIN, "bench", "--config", "configs/tiny-m32.json"] + SMALL + ["--attention-kernel", kernel, "--repeats", "2",
                                                                           "--json", out])
    r = json.load(open(out)) if p.returncode == 0 else {}
    a = r.get("attention_kernel", {})
    check(a.get("kernel") == kernel and a.get("seq") == 64 and a.get("batch") == 2 and a.get("seconds", 0) > 0
          and a.get("peak_extra_bytes", -1) >= 0 and "components" not in r,
          "--attention-kernel %s: shape, time and memory only (%s)" % (kernel, a))

# --- bad input: one line, non-zero exit ---------------------------------------------------------
p = run([BIN, "bench", "--config", "configs/tiny-m32-pp2.json"])
check(p.returncode != 0 and "parallel.pipeline_parallel_size" in p.stderr and p.stderr.count("\n") == 1,
      "pipeline config refused in one line: %s" % p.stderr.strip())
p = run([BIN, "bench", "--config", "configs/tiny-m32.json", "--json", os.path.join(WORK, "no", "such", "x.json")])
check(p.returncode != 0 and "cannot open for writing" in p.stderr, "unwritable --json refused before measuring")
p = run([BIN, "bench", "--config", "configs/tiny-m32.json", "--steps", "0"])
check(p.returncode != 0 and "--steps" in p.stderr, "--steps 0 refused")
p = run([BIN, "bench", "--config", "configs/tiny-m32.json", "--attention-kernel", "blockwise"])
check(p.returncode != 0 and "--attention-kernel: expected sdpa or materialised, got 'blockwise'" in p.stderr,
      "unknown attention kernel refused: %s" % p.stderr.strip())

# --- bench --profile and bench/profile_step.py -------------------------------------------------
# Two threads, so that the experts' GEMMs are split between the calling thread and a worker: the
# parallel regions must hold both threads' GEMMs, which the experts' shapes give exactly. SMALL:
# 2 layers x 2 micro-batches of 128 tokens, top-2 -> 256 rows per layer and micro-batch, each
# 2 x (256 x 512) + 2 x (256 x 256) FLOPs forward; the backward twice that.
trace = os.path.join(WORK, "trace.json")
p = subprocess.run([BIN, "bench", "--config", "configs/tiny-m32.json"] + SMALL +
                   ["--step-only", "--steps", "1", "--warmup", "1", "--profile", trace],
                   cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600)
check(p.returncode == 0 and os.path.getsize(trace) > 0, "bench --profile writes a trace (%s)" % p.stderr.strip()[-200:])
profile_json = os.path.join(WORK, "profile.json")
p = run([sys.executable, "bench/profile_step.py", trace, "--json", profile_json])
check(p.returncode == 0, "profile_step.py reads it (%s)" % p.stderr.strip()[-300:])
prof = json.load(open(profile_json))
regions = {r["name"]: r for r in prof.get("parallel_regions", [])}
forward = regions.get("yuanmoe::grouped_swiglu", {})
backward = next((r for n, r in regions.items() if "GroupedSwiGLU" in n), {})
want_gflop = 2 * 2 * 256 * (2 * 256 * 512 + 2 * 256 * 256) / 1e9
check(math.isclose(forward.get("gflop", 0), want_gflop, rel_tol=1e-9) and forward.get("worker_ms", 0) > 0,
      "experts' forward region: %.4f GFLOP over both threads (want %.4f), worker %.1f ms"
      % (forward.get("gflop", 0), want_gflop, forward.get("worker_ms", 0)))
check(math.isclose(backward.get("gflop", 0), 2 * want_gflop, rel_tol=1e-9),
      "experts' backward region: %.4f GFLOP (want twice the forward's)" % backward.get("gflop", 0))
check(prof["step_ms"] > 0 and prof["phases"]["backward"] > 0, "the step's phases are summed")

# A trace with device kernels (as CUDA gives): their time summed per name, largest first.
fake = os.path.join(WORK, "kernels.json")
json.dump({"traceEvents": [
    {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 50,
     "args": {"Input Dims": [[64, 64], [64, 64]]}},
    {"ph": "X", "cat": "kernel", "name": "gemm_a", "pid": 0, "tid": 7, "ts": 10, "dur": 30},
    {"ph": "X", "cat": "kernel", "name": "gemm_a", "pid": 0, "tid": 7, "ts": 60, "dur": 30},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "pid": 0, "tid": 8, "ts": 0, "dur": 5}]}, open(fake, "w"))
p = run([sys.executable, "bench/profile_step.py", fake, "--json", profile_json])
prof = json.load(open(profile_json))
check(p.returncode == 0 and math.isclose(prof.get("device_ms", 0), 0.065)
      and [(k["name"], k["calls"]) for k in prof.get("kernels", [])] == [("gemm_a", 2), ("Memcpy HtoD", 1)],
      "device kernels summed per name: %s" % prof.get("kernels"))

# --- the eager PyTorch step bench ----------------------------------------------------------------
cfg = json.load(open(os.path.join(ROOT, "configs", "tiny-m32.json")))
cfg["model"].update(num_layers=1, max_seq_length=32)
cfg["moe"]["num_experts"] = 4
small_cfg = os.path.join(WORK, "small.json")
json.dump(cfg, open(small_cfg, "w"))
eager_out = os.path.join(WORK, "eager.json")
p = run([sys.executable, "bench/pytorch_eager_step.py", "--config", small_cfg, "--seq-length", "32",
         "--steps", "1", "--warmup", "1", "--threads", "1", "--json", eager_out])
check(p.returncode == 0, "eager step bench exits 0 (%s)" % p.stderr.strip()[-300:])
e = json.load(open(eager_out))
check(e["tokens_per_step"] == 32 * cfg["train"]["global_batch_size"] and e["tokens_per_s"] > 0,
      "eager JSON: tokens per step and tokens/s")
check(abs(e["losses"][0] - math.log(8192)) < 0.5, "eager first loss %.3f near ln(8192)" % e["losses"][0])
cfg["moe"]["router"] = "relu"
json.dump(cfg, open(small_cfg, "w"))
p = run([sys.executable, "bench/pytorch_eager_step.py", "--config", small_cfg])
check(p.returncode == 2 and "moe.router" in p.stderr, "eager bench refuses a router the reference lacks")

sys.exit(check.finish(WORK))
