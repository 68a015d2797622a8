#!/usr/bin/env python3
"""The report of a GPU check (scripts/gpu-check.sh), from whatever its stages have left so far:
OUT_DIR/report.md and OUT_DIR/report.json, bench.json and eager.json copied into OUT_DIR once
they are complete, and LOGS_DIR/summary.txt (the table the script prints last). Run after every
stage, so a check killed at any moment leaves a readable report. Missing pieces are reported as
missing, never guessed.

usage: bench/gpu_report.py LOGS_DIR OUT_DIR [CONFIG]"""

import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET


def read(logs, name):
    path = os.path.join(logs, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def load_json(logs, name):
    text = read(logs, name)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None  # still being written, or cut off by a kill


def stages(logs):
    rows = []
    for line in (read(logs, "stages.tsv") or "").splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append({"stage": parts[0], "status": parts[1], "seconds": int(parts[2]), "note": parts[3]})
    current = (read(logs, "current.tsv") or "").strip().split("\t")
    if len(current) == 4:  # a stage still running: its seconds up to its log's last line
        log = os.path.join(logs, current[0] + ".log")
        last = os.path.getmtime(log) if os.path.exists(log) else time.time()
        rows.append({"stage": current[0], "status": "running", "seconds": max(0, int(last) - int(current[2])),
                     "note": current[3]})
    return rows


def preflight(text):
    fields = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("torch", "GPU", "python", "host", "nvcc", "g++", "cmake", "ninja", "system nccl.h",
                           "wheel nccl.h", "gnuplot", ".gpu-bundle", "repository"):
            fields[key] = value.strip()
    return fields


def gtest_results(logs):
    """Per-test results of the device tests: from the XML when the binary finished, else from the
    log of a run cut short."""
    xml_text = read(logs, "device-tests.xml")
    if xml_text:
        try:
            root = ET.fromstring(xml_text)
            tests = []
            for case in root.iter("testcase"):
                name = "%s.%s" % (case.get("classname"), case.get("name"))
                failure = case.find("failure")
                skipped = case.find("skipped") is not None or case.get("result") == "skipped"
                status = "failed" if failure is not None else ("skipped" if skipped else "passed")
                message = (failure.get("message") or "").splitlines()[:3] if failure is not None else []
                if skipped and case.find("skipped") is not None:
                    message = (case.find("skipped").get("message") or "").splitlines()
                # gtest prefixes "file:line" lines; the words are what matter
                message = [m.strip() for m in message if m.strip() and not re.match(r"^\S+:\d+$", m.strip())]
                tests.append({"test": name, "status": status, "message": " / ".join(m for m in message if m)})
            return tests
        except ET.ParseError:
            pass
    text = read(logs, "device-tests.log") or ""
    tests = {}
    for status, name in re.findall(r"^\[\s+(OK|FAILED|SKIPPED)\s+\] (\S+\.\S+) \(", text, re.M):
        tests[name] = {"OK": "passed", "FAILED": "failed", "SKIPPED": "skipped"}[status]
    started = re.findall(r"^\[ RUN      \] (\S+)", text, re.M)
    for name in started:
        tests.setdefault(name, "unfinished")
    return [{"test": n, "status": s, "message": ""} for n, s in tests.items()]


def ctest_results(text):
    results = []
    for name, status in re.findall(r"Test +#\d+: (\S+) \.+\**\s*([A-Za-z][A-Za-z ]*?)\s+[\d.]+ sec", text or ""):
        status = {"Passed": "passed", "Skipped": "skipped"}.get(status.strip(), "failed: " + status.strip())
        results.append({"test": name, "status": status})
    return results


def counts(results):
    passed = sum(r["status"] == "passed" for r in results)
    skipped = sum(r["status"] == "skipped" for r in results)
    failed = [r["test"] for r in results if r["status"] not in ("passed", "skipped")]
    return passed, skipped, failed


def first_error(text):
    for line in (text or "").splitlines():
        if re.search(r"error|Error|FAILED|cannot|not found|No such", line) and not line.startswith("$ "):
            return line.strip()[:160]
    return ""


def headline(stage, logs, report):
    """One figure or one message per stage, for the summary table."""
    name, status = stage["stage"], stage["status"]
    log = read(logs, name + ".log") or ""
    if status == "skipped":
        return stage["note"]
    if name == "preflight":
        p = report["machine"]
        return "; ".join(x for x in (p.get("torch", ""), p.get("GPU", ""))) or first_error(log)
    if name == "configure":
        m = re.search(r"libtorch ([\d.]+)", log)
        n = re.search(r"nccl\.h: (\S+)", log)
        return ("libtorch %s" % m.group(1) if m else "") + ("; nccl.h %s" % n.group(1) if n else "") or first_error(log)
    if name.startswith("build"):
        steps = re.findall(r"^\[(\d+)/(\d+)\]", log, re.M)
        done = "%s of %s build steps" % steps[-1] if steps else ""
        return first_error(log) if status == "failed" else done
    if name == "device-tests":
        passed, skipped, failed = counts(report["device_tests"])
        return "%d passed, %d skipped, %d failed%s" % (passed, skipped, len(failed),
                                                      (": " + ", ".join(failed[:3])) if failed else "")
    if name == "bench":
        b = report["bench"]
        if not b:
            return first_error(log) or "no bench.json"
        text = "%.0f tokens/s, MFU %.1f%% of %s" % (b["tokens_per_s"], 100 * b["mfu"], rate(b["peak_flops"]))
        if b.get("mfu_stated_peak"):
            text += " (%.1f%% of the measured %s)" % (100 * b["mfu_measured_peak"], rate(b["measured_peak_flops"]))
        return text
    if name == "eager":
        e = report["eager"]
        if e and e.get("tokens_per_s"):
            return "%.0f tokens/s" % e["tokens_per_s"]
        return first_error(log) or "no eager.json"
    if name == "profile":
        m = re.search(r"^device: ([\d.]+ ms) of kernels", log, re.M)
        h = re.search(r"^profiled step, the calling thread's operators' self time: ([\d.]+ ms)", log, re.M)
        if m or h:
            return "; ".join(x for x in ("host %s" % h.group(1) if h else "", "device %s" % m.group(1) if m else "") if x)
        return first_error(log) or "no profile"
    if name == "ctest":
        passed, skipped, failed = counts(report["ctest"])
        return "%d passed, %d skipped, %d failed%s" % (passed, skipped, len(failed),
                                                      (": " + ", ".join(failed[:3])) if failed else "")
    return stage["note"]


def rate(flops_per_s):
    """A FLOP rate in the unit that suits it (a CPU's GFLOP/s, a GPU's TFLOP/s)."""
    return "%.1f GFLOP/s" % (flops_per_s / 1e9) if flops_per_s < 1e12 else "%.0f TFLOP/s" % (flops_per_s / 1e12)


def tail(text, lines=15):
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    logs, out = sys.argv[1], sys.argv[2]
    config = sys.argv[3] if len(sys.argv) > 3 else "configs/gpu-bench.json"
    report = {
        "config": config,
        "machine": preflight(read(logs, "preflight.log")),
        "stages": stages(logs),
        "device_tests": gtest_results(logs),
        "bench": load_json(logs, "bench.json"),
        "eager": load_json(logs, "eager.json"),
        "ctest": ctest_results(read(logs, "ctest.log")),
        "left_to_ci": (read(logs, "left-to-ci.txt") or "").strip(),
    }
    for s in report["stages"]:
        s["headline"] = headline(s, logs, report)
    for name in ("bench.json", "eager.json"):  # complete files only
        if load_json(logs, name) is not None:
            shutil.copyfile(os.path.join(logs, name), os.path.join(out, "." + name + ".part"))
            os.replace(os.path.join(out, "." + name + ".part"), os.path.join(out, name))

    table = ["%-13s %-8s %7s  %s" % ("stage", "status", "seconds", "headline")]
    table += ["%-13s %-8s %7d  %s" % (s["stage"], s["status"], s["seconds"], s["headline"]) for s in report["stages"]]
    with open(os.path.join(logs, "summary.txt"), "w") as f:
        f.write("\n".join(table) + "\n")

    md = ["# GPU check", "",
          "Written by `bench/gpu_report.py` from what `scripts/gpu-check.sh` had left when it last ran; "
          "every log is in `logs.tar.gz`.", ""]
    m = report["machine"]
    for key in ("GPU", "torch", "python", "host", "nvcc", "g++", "cmake", "ninja", "system nccl.h", "wheel nccl.h",
                "gnuplot", ".gpu-bundle", "repository"):
        if key in m:
            md.append("- %s: %s" % (key, m[key]))
    md += ["", "| stage | status | seconds | headline |", "|---|---|---|---|"]
    md += ["| %s | %s | %d | %s |" % (s["stage"], s["status"], s["seconds"], s["headline"].replace("|", "/"))
           for s in report["stages"]]

    failed_device = [t for t in report["device_tests"] if t["status"] not in ("passed", "skipped")]
    skipped_device = [t for t in report["device_tests"] if t["status"] == "skipped"]
    if report["device_tests"]:
        md += ["", "## Device tests (`yuanmoe_device_tests`)", ""]
        md += ["- %s: %s%s" % (t["test"], t["status"], (" (" + t["message"] + ")") if t["message"] else "")
               for t in failed_device + skipped_device]
        passed = [t["test"] for t in report["device_tests"] if t["status"] == "passed"]
        md.append("- passed (%d): %s" % (len(passed), ", ".join(passed)))

    b, e = report["bench"], report["eager"]
    md += ["", "## `yuanmoe bench --config %s`" % config, ""]
    if b:
        md += ["| tokens/step | median step ms | tokens/s | MFU | against | MFU vs measured matmul "
               "| peak GPU memory MiB |",
               "|---|---|---|---|---|---|---|",
               "| %d | %.1f | %.0f | %.1f %% | %s | %.1f %% of %s (%d^3, %s) | %.0f |" % (
                   b["tokens_per_step"], b["median_step_seconds"] * 1e3, b["tokens_per_s"], 100 * b["mfu"],
                   rate(b["peak_flops"]), 100 * b.get("mfu_measured_peak", 0), rate(b.get("measured_peak_flops", 0)),
                   b.get("matmul_size", 0), b.get("precision", "?"), b.get("peak_device_bytes", 0) / 2**20)]
        if b.get("components"):
            md += ["", "| part | ms / step |", "|---|---|"]
            md += ["| %s | %.2f |" % (p["name"], p["seconds"] * 1e3) for p in b["components"]]
        if b.get("pairs"):
            md += ["", "| side by side | A ms | B ms | A / B |", "|---|---|---|---|"]
            md += ["| %s: %s vs %s | %.2f | %.2f | %.2f |" % (p["name"], p["a"], p["b"], p["a_seconds"] * 1e3,
                                                            p["b_seconds"] * 1e3, p["ratio_a_over_b"])
                   for p in b["pairs"]]
    else:
        md.append("no result (bench.log)")
    md += ["", "## Eager PyTorch reference, same config and device", ""]
    if e and e.get("tokens_per_s"):
        md.append("%.0f tokens/s (median of %d steps) on %s%s" % (
            e["tokens_per_s"], len(e["step_seconds"]), e.get("device", "?"),
            ", peak CUDA memory %.0f MiB" % (e["peak_cuda_bytes"] / 2**20) if "peak_cuda_bytes" in e else ""))
        if b:
            md += ["", "yuanmoe / eager = **%.2fx** tokens/s" % (b["tokens_per_s"] / e["tokens_per_s"])]
    else:
        md.append("no result (eager.log)")

    profile = read(logs, "profile.log") or ""
    if "\ndevice: " in profile:  # the kernels' time per name, from bench/profile_step.py
        md += ["", "## One step under the profiler: device time per kernel (profile.log)", "", "```",
               profile[profile.index("\ndevice: ") + 1:].rstrip(), "```"]

    if report["ctest"]:
        passed, skipped, failed = counts(report["ctest"])
        md += ["", "## ctest on the device", "",
               "%d passed, %d skipped, %d failed%s" % (passed, skipped, len(failed),
                                                     (": " + ", ".join(failed)) if failed else "")]
    md += ["", "Left to CI (CPU machines): the tests matching `%s` (they force the CPU or need gnuplot) and the "
           "label `fuzz` (replays of fuzz inputs), label `golden` (exact CPU losses of the CI machine's kind); "
           "the device tests run in their own stage." % report["left_to_ci"]]

    problems = [s for s in report["stages"] if s["status"] in ("failed", "timeout", "running")]
    if problems:
        md += ["", "## Logs of the stages that failed, ran out of time or were still running (last lines)"]
        for s in problems:
            md += ["", "### %s (%s)" % (s["stage"], s["status"]), "", "```", tail(read(logs, s["stage"] + ".log")),
                   "```"]

    with open(os.path.join(out, ".report.json.part"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(os.path.join(out, ".report.json.part"), os.path.join(out, "report.json"))
    with open(os.path.join(out, ".report.md.part"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(out, ".report.md.part"), os.path.join(out, "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
