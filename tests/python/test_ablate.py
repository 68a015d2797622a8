#!/usr/bin/env python3
"""scripts/ablate.py end to end, on a tiny model and the synthetic corpus: an ad hoc study of two
variants x two seeds trains four runs and writes results.csv / results.md / the plots; the figures
match the runs' own metrics.jsonl; a rerun trains nothing and a run whose summary is lost is
summarised again to the same figures; the shipped study files plan 24 distinct runs (the
32-expert attention run shared by both studies); bad study files give one line naming the file.

usage: python3 test_ablate.py BUILD_DIR/yuanmoe
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "support"))
from harness import Checks, prepare_data, tiny_config  # noqa: E402

BIN = os.path.abspath(sys.argv[1])
ABLATE = os.path.join(ROOT, "scripts", "ablate.py")
WORK = tempfile.mkdtemp(prefix="yuanmoe-ablate-")
check = Checks()


def ablate(*args, expect_ok=True):
    p = subprocess.run([sys.executable, ABLATE, "--bin", BIN, *args], cwd=WORK, capture_output=True, text=True,
                       timeout=600)
    if expect_ok and p.returncode != 0:
        raise SystemExit("FAIL: ablate.py %s exited %d\n%s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
    return p


def prepare():
    prepare_data(BIN, WORK)
    config = tiny_config(checkpoint={"interval": 3, "keep_last": 1},
                         log={"interval": 2, "progress": False, "plots": False, "peak_tflops": 1})
    with open(os.path.join(WORK, "base.json"), "w") as f:
        json.dump(config, f)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main():
    try:
        prepare()
        study = ["--out", "out", "--name", "tiny", "--base", "base.json", "--seeds", "2", "--jobs", "2",
                 "--variant", "top2", "--variant", "relu::moe.router=relu,moe.relu_l1_init=0.01"]
        first = ablate(*study)
        check("4 to train" in first.stdout, "first call trains 4 runs: " + first.stdout.splitlines()[0])
        rows = read_csv(os.path.join(WORK, "out", "results.csv"))
        check(len(rows) == 4 and {(r["variant"], r["seed"]) for r in rows} ==
              {("top2", "1"), ("top2", "2"), ("relu", "1"), ("relu", "2")}, "results.csv: one row per variant and seed")
        # The figures are those of the runs' own logs.
        for r in rows:
            evals = [json.loads(l) for l in open(os.path.join(WORK, "out", "runs", r["run"], "run", "metrics.jsonl"))
                     if '"split":"valid"' in l.replace(" ", "")]
            final = max(evals, key=lambda e: e["step"])
            check(final["step"] == 6 and abs(float(r["final_valid_loss"]) - final["loss"]) < 1e-5 and
                  abs(float(r["best_valid_loss"]) - min(e["loss"] for e in evals)) < 1e-5,
                  "%s seed %s: final/best valid loss %s/%s match metrics.jsonl" %
                  (r["variant"], r["seed"], r["final_valid_loss"], r["best_valid_loss"]))
            if r["variant"] == "top2":
                check(float(r["active_experts"]) == 2.0, "top-2: active experts per token = 2 (%s)" % r["active_experts"])
            entropy = float(r["router_entropy"])  # ReLU with a strong L1 may leave one expert a token: 0
            check(0 <= entropy <= 1.3863, "%s: router entropy %.4f in [0, ln 4]" % (r["variant"], entropy))
        # `tensorboard --logdir out/runs` names the runs by variant and seed.
        event_dirs = sorted(os.path.relpath(d, os.path.join(WORK, "out", "runs"))
                            for d, _, files in os.walk(os.path.join(WORK, "out", "runs"))
                            if any(f.startswith("events.out.tfevents.") for f in files))
        check(event_dirs == ["relu/seed_1", "relu/seed_2", "top2/seed_1", "top2/seed_2"],
              "TensorBoard runs under out/runs: %s" % event_dirs)
        for r in rows:
            check(0 <= float(r["router_ties"]) <= 1 and 0 <= float(r["router_exact_ties"]) <= float(r["router_ties"]),
                  "%s seed %s: tie shares %s, %s in [0, 1], exact <= within 1e-6" %
                  (r["variant"], r["seed"], r["router_ties"], r["router_exact_ties"]))
        seeds_differ = rows[0]["final_valid_loss"] != rows[1]["final_valid_loss"]
        check(seeds_differ, "seeds 1 and 2 give different runs")
        md = open(os.path.join(WORK, "out", "results.md")).read()
        check("| top2 |" in md and "| relu |" in md and "±" in md, "results.md has a row per variant with mean ± std")
        if shutil.which("gnuplot"):
            pngs = sorted(f for f in os.listdir(os.path.join(WORK, "out")) if f.endswith(".png"))
            check(pngs == ["tiny_load_relu.png", "tiny_load_top2.png", "tiny_valid_loss.png"], "plots: %s" % pngs)
        check(not os.path.exists(os.path.join(WORK, "out", "runs", rows[0]["run"], "run", "checkpoints")),
              "a finished run's checkpoints are removed")
        # Resumable: nothing is trained again; a lost summary is rebuilt from the finished run.
        again = ablate(*study)
        check("0 to train" in again.stdout, "second call trains nothing: " + again.stdout.splitlines()[0])
        os.remove(os.path.join(WORK, "out", "runs", rows[2]["run"], "summary.json"))
        third = ablate(*study)
        rebuilt = read_csv(os.path.join(WORK, "out", "results.csv"))
        same = all(a[k] == b[k] for a, b in zip(rows, rebuilt) for k in ("final_valid_loss", "load_cv", "router_entropy"))
        check("1 to train" in third.stdout and same, "a lost summary is rebuilt with the same figures")
        # The shipped studies: 27 (variant, seed) pairs, 24 distinct runs.
        dry = ablate("--dry-run", "--out", "dry", os.path.join(ROOT, "configs/ablation/study-routers.json"),
                     os.path.join(ROOT, "configs/ablation/study-experts.json"))
        check(dry.stdout.startswith("ablate: 24 runs"), "shipped studies: " + dry.stdout.splitlines()[0])
        # Bad input: one line naming the file or the flag, exit 2, nothing trained.
        with open(os.path.join(WORK, "bad.json"), "w") as f:
            json.dump({"name": "x", "seeds": 1, "variants": [{"name": "a", "config": "base.json"}], "sed": []}, f)
        with open(os.path.join(WORK, "missing.json"), "w") as f:
            json.dump({"name": "x", "seeds": 1, "variants": [{"name": "a", "config": "nope.json"}]}, f)
        for args, needle in ((["bad.json"], 'bad.json: unknown key "sed"'),
                             (["missing.json"], "missing.json: variants[0]: config file not found: nope.json"),
                             (["--jobs", "0", "bad.json"], "--jobs must be >= 1"),
                             (["no-such-study.json"], "no-such-study.json: cannot read")):
            p = ablate("--out", "bad", *args, expect_ok=False)
            lines = p.stderr.strip().splitlines()
            check(p.returncode == 2 and len(lines) == 1 and needle in lines[0],
                  "bad input %s: exit %d, %r" % (args[-1], p.returncode, lines))
        check(not os.path.exists(os.path.join(WORK, "bad", "runs")), "bad input trained nothing")
    finally:
        code = check.finish(WORK)
    return code


if __name__ == "__main__":
    sys.exit(main())
