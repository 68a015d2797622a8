#!/usr/bin/env python3
"""One report of a GPU check (scripts/gpu-check.sh): OUT_DIR/report.md and OUT_DIR/report.json from
the logs and JSON the script left in OUT_DIR. Missing pieces are reported as missing, never
guessed. usage: bench/gpu_report.py OUT_DIR [CONFIG]"""

import json
import os
import re
import sys


def read(out, name):
    path = os.path.join(out, name)
    return open(path, errors="replace").read() if os.path.exists(path) else None


def load_json(out, name):
    text = read(out, name)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def ctest_summary(text):
    if not text:
        return None
    m = re.search(r"(\d+)% tests passed, (\d+) tests failed out of (\d+)", text)
    if not m:
        return None
    skipped = re.findall(r"^\s*\d+ - (\S+) \(Skipped\)", text, re.M)
    failed = re.findall(r"^\s*\d+ - (\S+) \((?:Failed|Timeout|SEGFAULT|Subprocess aborted|Not Run)\)", text, re.M)
    total, failures = int(m.group(3)), int(m.group(2))
    return {"total": total, "failed": failures, "skipped": len(skipped), "passed": total - failures - len(skipped),
            "failed_tests": failed, "skipped_tests": skipped}


def gtest_summary(text):
    if not text:
        return None
    passed = re.search(r"\[  PASSED  \] (\d+) test", text)
    skipped = re.search(r"\[  SKIPPED \] (\d+) test", text)
    failed = re.findall(r"\[  FAILED  \] (\S+)", text)
    return {"passed": int(passed.group(1)) if passed else 0, "skipped": int(skipped.group(1)) if skipped else 0,
            "failed_tests": sorted(set(t for t in failed if "." in t))}


def main():
    out = sys.argv[1]
    config = sys.argv[2] if len(sys.argv) > 2 else "configs/gpu-bench.json"
    steps = []
    for line in (read(out, "steps.txt") or "").splitlines():
        name, rc, seconds = line.split()
        steps.append({"step": name, "exit": int(rc), "seconds": int(seconds)})
    report = {
        "config": config,
        "machine": (read(out, "machine.txt") or "").strip().splitlines()[-2:],
        "steps": steps,
        "ctest": ctest_summary(read(out, "ctest.log")),
        "cuda_tests": gtest_summary(read(out, "cuda-tests.log")),
        "bench": load_json(out, "bench.json"),
        "eager": load_json(out, "eager.json"),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)

    lines = ["# GPU check", "", "Written by `bench/gpu_report.py` from the logs of `scripts/gpu-check.sh` in this folder.", ""]
    lines += ["machine: " + " / ".join(report["machine"]), "", "| step | exit | seconds |", "|---|---|---|"]
    lines += ["| %s | %d | %d |" % (s["step"], s["exit"], s["seconds"]) for s in steps]
    c = report["ctest"]
    lines += ["", "## Tests", ""]
    if c:
        lines.append("ctest: %d tests, %d passed, %d skipped, %d failed%s" % (
            c["total"], c["passed"], c["skipped"], c["failed"],
            (": " + ", ".join(c["failed_tests"])) if c["failed_tests"] else ""))
    else:
        lines.append("ctest: no summary (see ctest.log)")
    g = report["cuda_tests"]
    lines.append("CUDA tests alone: %s" % ("%d passed, %d skipped, failed: %s" % (
        g["passed"], g["skipped"], ", ".join(g["failed_tests"]) or "none") if g else "not run (see cuda-tests.log)"))
    b, e = report["bench"], report["eager"]
    lines += ["", "## `yuanmoe bench --config %s`" % config, ""]
    if b:
        lines += ["| tokens/step | median step ms | tokens/s | MFU | against | peak GPU memory MiB |", "|---|---|---|---|---|---|",
                  "| %d | %.1f | %.0f | %.1f %% | %.1f TFLOP/s (measured matmul: %.1f) | %.0f |" % (
                      b["tokens_per_step"], b["median_step_seconds"] * 1e3, b["tokens_per_s"], 100 * b["mfu"],
                      b["peak_flops"] / 1e12, b.get("measured_peak_flops", 0) / 1e12,
                      b.get("peak_device_bytes", 0) / 2**20)]
        if b.get("components"):
            lines += ["", "| part | ms / step |", "|---|---|"]
            lines += ["| %s | %.2f |" % (p["name"], p["seconds"] * 1e3) for p in b["components"]]
    else:
        lines.append("no result (see bench.log)")
    lines += ["", "## Eager PyTorch reference, same config and GPU", ""]
    if e and e.get("tokens_per_s"):
        lines.append("%.0f tokens/s (median of %d steps), peak CUDA memory %.0f MiB" % (
            e["tokens_per_s"], len(e["step_seconds"]), e.get("peak_cuda_bytes", 0) / 2**20))
        if b:
            lines.append("")
            lines.append("yuanmoe / eager = **%.2fx** tokens/s" % (b["tokens_per_s"] / e["tokens_per_s"]))
    else:
        lines.append("no result (see eager.log)")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
