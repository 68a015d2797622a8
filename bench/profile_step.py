#!/usr/bin/env python3
"""Where one training step's time goes, per operator: sums the Chrome trace that
`yuanmoe bench --profile TRACE.json` writes (LibTorch's Kineto profiler, one step after the timed
ones) into self time per operator (its time less that of the operators it called), forward and
backward apart (docs/benchmarks.md, "Profile of the step").

The calling thread's operators add up to the step's wall time. Where yuanmoe splits work over the
intra-op threads itself (the experts' GEMMs, the cross-entropy's row blocks), the workers run
with the caller's profiler state, so their operators are in the trace too, on threads of their
own: they overlap the caller's time and are reported apart, with each such region's wall time and
the GFLOP/s its matrix products reach on all threads together.

An operator counts as backward when it runs inside one of the autograd engine's
`autograd::engine::evaluate_function: ...Backward` events (a worker's, when the caller's
operator around it does); everything else (forward, loss, the gradient norm, AdamW) counts as
forward and optimizer. Then the matrix products by shape (aten::mm, addmm, bmm with their input
shapes; yuanmoe::small_mm, core/small_gemm.h's CPU kernel): calls, time and GFLOP/s per call. A
call made inside a parallel region runs on one thread, so its rate compares with one thread's
share of the peak. On a GPU the operators' times are the host's (launches, and waits where the
host syncs); the device's own time is the kernels', summed per kernel name at the end
(chrome://tracing or Perfetto show them on their streams).

usage: python3 bench/profile_step.py TRACE.json [--top 25] [--peak GFLOPS] [--json OUT.json]
"""

import argparse
import bisect
import collections
import json

BACKWARD = "autograd::engine::evaluate_function"


# yuanmoe::small_mm(_add) is core/small_gemm.h's kernel, recorded with (a, b) as its inputs.
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "yuanmoe::small_mm", "yuanmoe::small_mm_add")


def is_operator(name):
    """An ATen operator or yuanmoe's kernel: never a region of its own."""
    return name.startswith("aten::") or name in GEMMS


def gemm_flops(name, dims):
    """2 M N K (x batch) from the operator's input shapes; None when they are not matrices."""
    try:
        if name in ("aten::mm", "yuanmoe::small_mm", "yuanmoe::small_mm_add"):
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


def operator_events(events):
    """{thread: [event]} for complete operator events, sorted by start (outer events first)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    return by_thread


def self_times(thread_events, enclosing=lambda e: None):
    """[(event, in_backward, self_us, region)] for one thread's events, nested by time. `region` is
    the innermost enclosing event that is not an operator; `enclosing(e)` gives the caller's
    event around a worker's outermost events."""
    out = []
    stack = []  # [event, children_us, in_backward, region]
    for e in thread_events:
        while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
            finished = stack.pop()
            out.append((finished[0], finished[2], finished[0]["dur"] - finished[1], finished[3]))
        if stack:
            stack[-1][1] += e["dur"]
            parent_backward, region = stack[-1][2], stack[-1][3]
            if not is_operator(stack[-1][0]["name"]):
                region = stack[-1][0]
        else:
            outer = enclosing(e)
            parent_backward, region = (outer[1], outer[0]) if outer else (False, None)
        in_backward = parent_backward or e["name"].startswith(BACKWARD)
        stack.append([e, 0.0, in_backward, region])
    for finished in stack:
        out.append((finished[0], finished[2], finished[0]["dur"] - finished[1], finished[3]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--peak", type=float, help="the matmul peak bench measured, GFLOP/s (all threads)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    by_thread = operator_events(trace["traceEvents"] if isinstance(trace, dict) else trace)
    # The calling thread spans the whole step; workers only its parallel regions.
    main_thread = max(by_thread, key=lambda t: max(e["ts"] + e["dur"] for e in by_thread[t]) -
                      min(e["ts"] for e in by_thread[t]))
    main_rows = self_times(by_thread[main_thread])

    # A worker's event belongs to the innermost non-operator event of the caller around it.
    regions = sorted(((ev, backward) for ev, backward, _, _ in main_rows if not is_operator(ev["name"])),
                     key=lambda r: r[0]["ts"])
    starts = [r[0]["ts"] for r in regions]

    def enclosing(e):
        best = None
        for i in range(bisect.bisect_right(starts, e["ts"]) - 1, -1, -1):
            ev = regions[i][0]
            if ev["ts"] <= e["ts"] and e["ts"] + e["dur"] <= ev["ts"] + ev["dur"]:
                if best is None or ev["dur"] < best[0]["dur"]:
                    best = regions[i]
            if best is not None and ev["ts"] + 10 * ev["dur"] < e["ts"]:
                break
        return best

    worker_rows = []
    for thread, events in by_thread.items():
        if thread != main_thread:
            worker_rows += self_times(events, enclosing)

    totals = collections.Counter()
    per_op = collections.defaultdict(lambda: [0.0, 0])
    for event, backward, us, _ in main_rows:
        name = event["name"]
        phase = "backward" if backward else "forward + optimizer"
        if name.startswith(BACKWARD):
            name = "(autograd engine: " + name[len(BACKWARD) + 2:] + ")"
        totals[phase] += us
        per_op[(phase, name)][0] += us
        per_op[(phase, name)][1] += 1
    step_us = sum(totals.values())
    print("profiled step, the calling thread's operators' self time: %.1f ms" % (step_us / 1e3))
    result = {"step_ms": step_us / 1e3, "phases": {}, "operators": []}
    for phase in ("forward + optimizer", "backward"):
        print("\n%s: %.1f ms (%.0f %%)" % (phase, totals[phase] / 1e3, 100 * totals[phase] / step_us))
        result["phases"][phase] = totals[phase] / 1e3
        ranked = sorted(((us, n, name) for (p, name), (us, n) in per_op.items() if p == phase), reverse=True)
        for us, n, name in ranked[: args.top]:
            print("  %8.1f ms %5.1f %%  %5d x  %s" % (us / 1e3, 100 * us / step_us, n, name))
            result["operators"].append({"phase": phase, "name": name, "ms": us / 1e3, "calls": n})

    # Parallel regions: the caller's events that workers ran inside, with all threads' GEMM FLOPs.
    region_wall = collections.Counter()
    region_calls = collections.Counter()
    region_flops = collections.Counter()
    region_worker_us = collections.Counter()
    parallel_ids = set()
    for event, _, us, region in worker_rows:
        if region is not None:
            parallel_ids.add(id(region))
            region_worker_us[region["name"]] += us
    for event, _, _, region in main_rows + worker_rows:
        if event["name"] in GEMMS and region is not None and id(region) in parallel_ids:
            region_flops[region["name"]] += gemm_flops(event["name"], event.get("args", {}).get("Input Dims")) or 0
    for ev, _ in regions:
        if id(ev) in parallel_ids:
            region_wall[ev["name"]] += ev["dur"]
            region_calls[ev["name"]] += 1
    if region_wall:
        print("\nparallel regions (work split over the intra-op threads): wall time on the calling thread,")
        print("the workers' operator time beside it, and the GEMMs of all threads")
        result["parallel_regions"] = []
        for name, us in region_wall.most_common():
            flops = region_flops[name]
            rate = flops / us / 1e3
            peak = "  %5.1f %% of the peak" % (100 * rate / args.peak) if args.peak else ""
            print("  %8.1f ms %5d x  workers %7.1f ms  %6.2f GFLOP  %7.1f GFLOP/s%s  %s" %
                  (us / 1e3, region_calls[name], region_worker_us[name] / 1e3, flops / 1e9, rate, peak, name))
            result["parallel_regions"].append({"name": name, "ms": us / 1e3, "calls": region_calls[name],
                                               "worker_ms": region_worker_us[name] / 1e3, "gflop": flops / 1e9,
                                               "gflop_per_s": rate})

    per_shape = collections.defaultdict(lambda: [0.0, 0, 0, False])  # (name, dims) -> us, calls, flops, one thread
    for event, _, _, region in main_rows + worker_rows:
        if event["name"] not in GEMMS:
            continue
        dims = event.get("args", {}).get("Input Dims")
        flops = gemm_flops(event["name"], dims)
        if flops is None:
            continue
        entry = per_shape[(event["name"], json.dumps(dims))]
        entry[0] += event["dur"]
        entry[1] += 1
        entry[2] += flops
        entry[3] = entry[3] or (region is not None and id(region) in parallel_ids)
    if per_shape:
        gemm_flops_total = sum(v[2] for v in per_shape.values())
        print("\nmatrix products, all threads: %.1f GFLOP; per call, in parallel regions on one thread each" %
              (gemm_flops_total / 1e9))
        result["gemms"] = []
        for (name, dims), (us, n, flops, one_thread) in sorted(per_shape.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print("  %8.1f ms %5d x  %7.1f GFLOP/s%s  %s %s" %
                  (us / 1e3, n, flops / us / 1e3, " (1 thread)" if one_thread else "", name, dims))
            result["gemms"].append({"name": name, "dims": json.loads(dims), "ms": us / 1e3, "calls": n,
                                    "gflop_per_s": flops / us / 1e3, "one_thread": one_thread})
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            kernels[(e["cat"], e["name"])][0] += e["dur"]
            kernels[(e["cat"], e["name"])][1] += 1
    if kernels:
        busy = sum(us for us, _ in kernels.values())
        print("\ndevice: %.1f ms of kernels, copies and fills (summed over streams)" % (busy / 1e3))
        result["device_ms"] = busy / 1e3
        result["kernels"] = []
        for (cat, name), (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print("  %8.1f ms %5.1f %%  %5d x  %s%s" % (us / 1e3, 100 * us / busy, n,
                                                       "" if cat == "kernel" else "(" + cat + ") ", name[:100]))
            result["kernels"].append({"category": cat, "name": name, "ms": us / 1e3, "calls": n})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
