#!/usr/bin/env python3
"""Where one training step's time goes, per operator: sums the Chrome trace that
`yuanmoe bench --profile TRACE.json` writes (LibTorch's Kineto profiler, one step after the timed
ones) into self time per operator (its time less that of the operators it called), forward and
backward apart (docs/benchmarks.md, "Profile of the step").

An operator counts as backward when it runs inside one of the autograd engine's
`autograd::engine::evaluate_function: ...Backward` events; everything else (forward, loss, the
gradient norm, AdamW) counts as forward and optimizer. Then the matrix products by shape
(aten::mm, addmm, bmm with their input shapes): calls, time and GFLOP/s, the rate each shape
reaches against the matmul peak bench measured. CPU operators only: on a GPU the trace also holds
the kernels, which chrome://tracing or Perfetto show.

usage: python3 bench/profile_step.py TRACE.json [--top 25] [--json OUT.json]
"""

import argparse
import collections
import json

BACKWARD = "autograd::engine::evaluate_function"


GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def gemm_flops(name, dims):
    """2 M N K (x batch) from the operator's input shapes; None when they are not matrices."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = dims[0], dims[1]
            return 2 * m * n * k
        if name == "aten::addmm":
            (m, k), (_, n) = dims[1], dims[2]
            return 2 * m * n * k
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = dims[0], dims[1]
            return 2 * b * m * n * k
    except (TypeError, ValueError, IndexError):
        return None
    return None


def self_times(events):
    """[(event, phase, self_us)] for complete events, nested by time on each thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [event, children_us, in_backward]
        for e in thread_events:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                finished = stack.pop()
                out.append((finished[0], finished[2], finished[0]["dur"] - finished[1]))
            if stack:
                stack[-1][1] += e["dur"]
            in_backward = bool(stack and stack[-1][2]) or e["name"].startswith(BACKWARD)
            stack.append([e, 0.0, in_backward])
        for finished in stack:
            out.append((finished[0], finished[2], finished[0]["dur"] - finished[1]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json")
    args = parser.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    rows = self_times(trace["traceEvents"] if isinstance(trace, dict) else trace)
    totals = collections.Counter()
    per_op = collections.defaultdict(lambda: [0.0, 0])
    per_shape = collections.defaultdict(lambda: [0.0, 0, 0])  # (name, dims) -> us, calls, flops
    for event, backward, us in rows:
        name = event["name"]
        if name in GEMMS:
            dims = event.get("args", {}).get("Input Dims")
            flops = gemm_flops(name, dims)
            if flops is not None:
                key = (name, json.dumps(dims))
                per_shape[key][0] += event["dur"]
                per_shape[key][1] += 1
                per_shape[key][2] += flops
        phase = "backward" if backward else "forward + optimizer"
        if name.startswith(BACKWARD):
            name = "(autograd engine: " + name[len(BACKWARD) + 2:] + ")"
        totals[phase] += us
        per_op[(phase, name)][0] += us
        per_op[(phase, name)][1] += 1
    step_us = sum(totals.values())
    print("profiled step, operators' self time: %.1f ms" % (step_us / 1e3))
    result = {"step_ms": step_us / 1e3, "phases": {}, "operators": []}
    for phase in ("forward + optimizer", "backward"):
        print("\n%s: %.1f ms (%.0f %%)" % (phase, totals[phase] / 1e3, 100 * totals[phase] / step_us))
        result["phases"][phase] = totals[phase] / 1e3
        ranked = sorted(((us, n, name) for (p, name), (us, n) in per_op.items() if p == phase), reverse=True)
        for us, n, name in ranked[: args.top]:
            print("  %8.1f ms %5.1f %%  %5d x  %s" % (us / 1e3, 100 * us / step_us, n, name))
            result["operators"].append({"phase": phase, "name": name, "ms": us / 1e3, "calls": n})
    gemm_us = sum(v[0] for v in per_shape.values())
    gemm_flops_total = sum(v[2] for v in per_shape.values())
    if gemm_us:
        print("\nmatrix products: %.1f ms, %.1f GFLOP, %.1f GFLOP/s overall" %
              (gemm_us / 1e3, gemm_flops_total / 1e9, gemm_flops_total / gemm_us / 1e3))
        result["gemms"] = []
        for (name, dims), (us, n, flops) in sorted(per_shape.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print("  %8.1f ms %5d x  %7.1f GFLOP/s  %s %s" % (us / 1e3, n, flops / us / 1e3, name, dims))
            result["gemms"].append({"name": name, "dims": json.loads(dims), "ms": us / 1e3, "calls": n,
                                    "gflop_per_s": flops / us / 1e3})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
