#!/usr/bin/env python3
"""Where one training step's time goes, per operator: sums the Chrome trace that
`yuanmoe bench --profile TRACE.json` writes (LibTorch's Kineto profiler, one step after the timed
ones) into self time per operator (its time less that of the operators it called), forward and
backward apart (docs/benchmarks.md, "Profile of the step").

An operator counts as backward when it runs inside one of the autograd engine's
`autograd::engine::evaluate_function: ...Backward` events; everything else (forward, loss, the
gradient norm, AdamW) counts as forward and optimizer. CPU operators only: on a GPU the trace also
holds the kernels, which chrome://tracing or Perfetto show.

usage: python3 bench/profile_step.py TRACE.json [--top 25] [--json OUT.json]
"""

import argparse
import collections
import json

BACKWARD = "autograd::engine::evaluate_function"


def self_times(events):
    """[(name, phase, self_us)] for complete events, nested by time on each thread."""
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
                out.append((finished[0]["name"], finished[2], finished[0]["dur"] - finished[1]))
            if stack:
                stack[-1][1] += e["dur"]
            in_backward = bool(stack and stack[-1][2]) or e["name"].startswith(BACKWARD)
            stack.append([e, 0.0, in_backward])
        for finished in stack:
            out.append((finished[0]["name"], finished[2], finished[0]["dur"] - finished[1]))
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
    for name, backward, us in rows:
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
