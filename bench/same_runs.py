#!/usr/bin/env python3
"""Two builds, the same training: 20 steps of configs/tiny-m32.json on the demo corpus at four
layouts (1 process; dp=2; pp=2; dp=2 x ep=2 with the sharded optimizer), run with each binary,
then compared: every metrics.jsonl record with its timing fields left out must be equal, value
for value, and the final checkpoint's files (weights, optimizer state, RNG) equal byte for byte.
The manifest describes the run (its config, the files' checksums, a time), so a retired config
key changes it: its differing entries are listed, not counted as a failure.

For a refactor that must not change one bit: build the commit before it into another folder,
then

  bench/same_runs.py BEFORE/yuanmoe build/yuanmoe OUT

The corpus is the demo's (scripts/prepare-corpus.sh writes data/corpus_{train,valid}). Exit 0
when every layout matches; a table of what differs otherwise.
"""

import filecmp
import json
import os
import subprocess
import sys

STEPS = 20
LAYOUTS = {  # name: (processes, overrides)
    "single": (1, []),
    "dp2": (2, []),
    "pp2": (2, ["parallel.pipeline_parallel_size=2"]),
    "dp2_ep2_sharded": (2, ["parallel.expert=2", "parallel.shard_optimizer=true"]),
}
# What a record measures of the machine rather than of the arithmetic.
TIMING = {"time", "elapsed_s", "step_time_s", "tokens_per_s", "tok_s", "mfu", "wall_s", "pipeline_bubble",
          "ep_all_to_all_s", "ep_experts_forward_s", "ep_experts_backward_s", "eval_time_s", "timestamp"}


def train(binary, run_dir, processes, overrides):
    args = ["train", "--config", "configs/tiny-m32.json", "--run-dir", run_dir]
    sets = [f"train.max_steps={STEPS}", "train.eval_interval=10", "checkpoint.interval=20", "log.interval=1",
            "log.plots=false", "log.progress=false", "log.peak_tflops=1", *overrides]
    for s in sets:
        args += ["--set", s]
    command = [binary, *args] if processes == 1 else [binary, "launch", "--nproc", str(processes), "--", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(command, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {p.returncode}\n{p.stderr[-3000:]}")


def records(run_dir):
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out.append({k: v for k, v in record.items() if k not in TIMING and not k.endswith("_s")})
    return out


def checkpoint_files(run_dir):
    """(relative path, absolute path) of every file of the final checkpoint."""
    root = os.path.join(run_dir, "checkpoints")
    final = sorted(d for d in os.listdir(root) if d.startswith("step"))[-1]
    found = []
    for folder, _, files in os.walk(os.path.join(root, final)):
        for name in files:
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, root), path))
    return sorted(found)


def is_manifest(relative_path):
    return os.path.basename(relative_path) == "manifest.json"


def json_differences(a, b, prefix=""):
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += json_differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(root)"]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    before, after, out = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
    failures = 0
    print(f"{'layout':<18} {'records':>8} {'records equal':>14} {'checkpoint files':>17} {'bytes equal':>12}")
    for name, (processes, overrides) in LAYOUTS.items():
        dirs = {}
        for label, binary in (("before", before), ("after", after)):
            dirs[label] = os.path.join(out, name, label)
            if not os.path.exists(os.path.join(dirs[label], "metrics.jsonl")):
                train(binary, dirs[label], processes, overrides)
        a, b = records(dirs["before"]), records(dirs["after"])
        files_a, files_b = checkpoint_files(dirs["before"]), checkpoint_files(dirs["after"])
        same_records = a == b
        data_a = [x for x in files_a if not is_manifest(x[0])]
        data_b = [x for x in files_b if not is_manifest(x[0])]
        same_files = [x[0] for x in data_a] == [x[0] for x in data_b] and all(
            filecmp.cmp(x[1], y[1], shallow=False) for x, y in zip(data_a, data_b))
        print(f"{name:<18} {len(a):>8} {str(same_records):>14} {len(data_a):>17} {str(same_files):>12}")
        failures += (not same_records) + (not same_files)
        for (path, x), (_, y) in zip([f for f in files_a if is_manifest(f[0])], [f for f in files_b if is_manifest(f[0])]):
            changed = json_differences(json.load(open(x)), json.load(open(y)))
            if changed:
                print(f"  {path} differs (not a failure) at: {', '.join(changed[:8])}")
        if not same_records:
            for x, y in zip(a, b):
                if x != y:
                    print(f"  first difference:\n    before {x}\n    after  {y}")
                    break
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
