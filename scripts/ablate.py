#!/usr/bin/env python3
"""Router and expert-count ablations: every variant of a study, trained for the same steps on the
same data with seeds 1..S, evaluated on the same valid batches, summarised with error bars.

A study is a JSON file (configs/ablation/study-*.json):
  {"name": "routers", "seeds": 3,
   "set": ["train.max_steps=100", ...],                 # applied to every variant
   "variants": [{"name": "attention", "config": "attention.json"},      # beside the study file
                {"name": "linear+aux", "config": "linear.json",
                 "set": ["moe.aux_loss_coeff=0.01"]}, ...]}
or the same given on the command line (--name, --base, --variant NAME[:CONFIG][:KEY=VALUE,...]).

Runs live in OUT/runs/<key>/, the key a hash of (config file contents, overrides, seed), so a run
shared by two studies (the 32-expert attention router is in both) trains once, and a finished run
(OUT/runs/<key>/summary.json) is never trained again. An unfinished one is re-run with the same
command, and the trainer resumes it from its newest checkpoint. Each run's TensorBoard files go to
OUT/runs/<variant>/seed_<S>/ (log.tensorboard_dir), so `tensorboard --logdir OUT/runs` lists the
runs by variant and seed.

Writes OUT/results.csv (one row per study, variant and seed), OUT/results.md (mean +- sample std
over seeds), OUT/<study>_valid_loss.png (valid loss vs step, mean over seeds, error bars = std)
and OUT/<study>_load_<variant>.png (final expert load, layers x experts, mean over seeds).

usage: scripts/ablate.py [--out ablation] [--jobs 2] [--bin build/yuanmoe] [--dry-run] STUDY.json [STUDY.json ...]
       scripts/ablate.py --name NAME --base CONFIG --seeds S [--set K=V ...] --variant SPEC [...]
"""

import argparse
import concurrent.futures
import csv
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

METRICS = [  # (CSV column, results.md header, decimals)
    ("final_valid_loss", "final valid loss", 4),
    ("best_valid_loss", "best valid loss", 4),
    ("tokens_per_s", "tokens/s", 0),
    ("load_cv", "load CV", 3),
    ("experts_below_1pct", "experts < 1% of tokens", 2),
    ("router_entropy", "router entropy (nats)", 3),
    ("active_experts", "active experts / token", 2),
    ("router_ties", "tokens with k-th = (k+1)-th weight (1e-6)", 3),
    ("router_exact_ties", "... exactly", 3),
]


def fail(message):
    print("ablate: error: " + message, file=sys.stderr)
    sys.exit(2)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        fail("%s: cannot read (%s)" % (path, e.strerror))
    except ValueError as e:
        fail("%s: invalid JSON (%s)" % (path, e))


def load_study(path):
    study = read_json(path)
    if not isinstance(study, dict):
        fail("%s: a study is a JSON object" % path)
    for key in study:
        if key not in ("name", "seeds", "set", "variants", "comment"):
            fail("%s: unknown key \"%s\" (name, seeds, set, variants, comment)" % (path, key))
    if not isinstance(study.get("name"), str) or not study["name"]:
        fail("%s: \"name\" must be a non-empty string" % path)
    if not isinstance(study.get("seeds"), int) or study["seeds"] < 1:
        fail("%s: \"seeds\" must be an integer >= 1" % path)
    if not isinstance(study.get("set", []), list):
        fail("%s: \"set\" must be a list of KEY=VALUE strings" % path)
    variants = study.get("variants")
    if not isinstance(variants, list) or not variants:
        fail("%s: \"variants\" must be a non-empty list" % path)
    names = set()
    for i, v in enumerate(variants):
        where = "%s: variants[%d]" % (path, i)
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not isinstance(v.get("config"), str):
            fail(where + ": needs \"name\" and \"config\" strings")
        if v["name"] in names:
            fail(where + ": duplicate name \"%s\"" % v["name"])
        names.add(v["name"])
        # A study file names configs relative to its own directory.
        v["config"] = os.path.normpath(os.path.join(os.path.dirname(path), v["config"]))
        if not os.path.isfile(v["config"]):
            fail(where + ": config file not found: " + v["config"])
        if not isinstance(v.get("set", []), list):
            fail(where + ": \"set\" must be a list of KEY=VALUE strings")
    return study


def study_from_args(args):
    if not args.base or not args.variant:
        fail("--name needs --base and at least one --variant")
    variants = []
    for spec in args.variant:
        parts = spec.split(":")
        name, config, overrides = parts[0], args.base, []
        for part in parts[1:]:
            if part.endswith(".json"):
                config = part
            elif part:
                overrides += part.split(",")
        variants.append({"name": name, "config": config, "set": overrides})
    return {"name": args.name, "seeds": args.seeds, "set": args.set or [], "variants": variants}


def run_key(config_path, overrides, seed):
    h = hashlib.sha256()
    with open(config_path, "rb") as f:
        h.update(f.read())
    h.update(json.dumps([overrides, seed]).encode())
    return h.hexdigest()[:12]


def plan_runs(studies, out):
    """-> {key: run}, each run with its command-line overrides, and per study its (variant, seed, key)."""
    runs, members = {}, {}
    for study in studies:
        members[study["name"]] = []
        for v in study["variants"]:
            overrides = list(study.get("set", [])) + list(v.get("set", []))
            for seed in range(1, study["seeds"] + 1):
                key = run_key(v["config"], overrides, seed)
                runs.setdefault(key, {"key": key, "config": v["config"], "overrides": overrides, "seed": seed,
                                      "dir": os.path.join(out, "runs", key), "label": v["name"]})
                members[study["name"]].append((v["name"], seed, key))
    # TensorBoard's run names: <variant>/seed_<S>, with the key where two runs would share one.
    names = {}
    for run in runs.values():
        names.setdefault((safe(run["label"]), run["seed"]), []).append(run["key"])
    for run in runs.values():
        label = safe(run["label"])
        if len(names[(label, run["seed"])]) > 1:
            label += "-" + run["key"][:6]
        run["tensorboard"] = "%s/seed_%d" % (label, run["seed"])
    return runs, members


def expected_cost(run):
    """Relative cost for scheduling the longest runs first: experts computed per token."""
    config = read_json(run["config"])
    moe = config.get("moe", {})
    settings = dict(kv.split("=", 1) for kv in run["overrides"] if "=" in kv)
    router = settings.get("moe.router", moe.get("router", "attention"))
    experts = int(settings.get("moe.num_experts", moe.get("num_experts", 32)))
    return {"dense": experts, "relu": experts / 4}.get(router, 2)


def train(run, binary, threads, keep_checkpoints):
    os.makedirs(run["dir"], exist_ok=True)
    with open(os.path.join(run["dir"], "variant.json"), "w") as f:
        json.dump({k: run[k] for k in ("label", "config", "overrides", "seed")}, f, indent=1)
    # The event files beside the hashed run dirs, under a readable name (relative to the run dir).
    tensorboard_dir = os.path.join("..", "..", run["tensorboard"])
    command = [binary, "train", "--config", run["config"], "--run-dir", os.path.join(run["dir"], "run"),
               "--set", "train.seed=%d" % run["seed"], "--set", "log.tensorboard_dir=" + tensorboard_dir]
    for kv in run["overrides"]:
        command += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.time()
    with open(os.path.join(run["dir"], "train.out"), "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        return run, "exit %d (see %s)" % (code, os.path.join(run["dir"], "train.out"))
    summary = summarise(os.path.join(run["dir"], "run", "metrics.jsonl"))
    summary["wall_s"] = round(time.time() - started, 1)
    summary["threads"] = threads
    with open(os.path.join(run["dir"], "summary.json"), "w") as f:
        json.dump(summary, f)
    if not keep_checkpoints:  # a finished run is never trained again; its metrics stay
        shutil.rmtree(os.path.join(run["dir"], "run", "checkpoints"), ignore_errors=True)
    return run, None


def summarise(metrics_path):
    """The figures of one run from its metrics.jsonl (the trainer's log; docs/training.md)."""
    train_lines, evals = [], {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "valid":
                evals[record["step"]] = record  # a resumed run logs a step again: keep the last
            elif "tokens_per_s" in record:
                train_lines.append(record)
    if not evals:
        raise SystemExit("%s: no evaluation lines" % metrics_path)
    final = evals[max(evals)]
    load_LE = final.get("expert_load", [])

    def layer_mean(key):  # mean over MoE layers; NaN for a run logged before the trainer wrote `key`
        values_L = final.get(key, [])
        return sum(values_L) / len(values_L) if values_L else float("nan")

    # The first logged interval includes start-up (allocator warm-up): leave it out of the rate.
    rates = [r["tokens_per_s"] for r in train_lines[1:]] or [r["tokens_per_s"] for r in train_lines]
    return {
        "final_valid_loss": final["loss"],
        "best_valid_loss": min(e["loss"] for e in evals.values()),
        "tokens_per_s": sum(rates) / len(rates),
        # The trainer's per-layer figures (docs/routers.md, "What a run reports about routing").
        "load_cv": layer_mean("load_cv"),
        "experts_below_1pct": layer_mean("experts_under_1pct"),
        "router_entropy": layer_mean("router_entropy"),
        "active_experts": layer_mean("active_experts"),
        "router_ties": layer_mean("router_ties"),
        "router_exact_ties": layer_mean("router_exact_ties"),
        "valid_curve": sorted((step, e["loss"]) for step, e in evals.items()),
        "final_load": load_LE,
        "final_step": max(evals),
    }


def mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def write_results(studies, members, runs, out):
    rows = []
    for study in studies:
        for variant, seed, key in members[study["name"]]:
            summary = read_json(os.path.join(runs[key]["dir"], "summary.json"))
            rows.append((study["name"], variant, seed, key, summary))
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study", "variant", "seed", "run"] + [m[0] for m in METRICS] + ["final_step", "wall_s", "threads"])
        for study, variant, seed, key, s in rows:
            writer.writerow([study, variant, seed, key] + ["%.6g" % s.get(m[0], float("nan")) for m in METRICS] +
                            [s["final_step"], s["wall_s"], s["threads"]])
    lines = ["# Ablation results", "",
             "Generated by scripts/ablate.py from %s/runs/*/summary.json; mean ± sample std over seeds." % out, ""]
    for study in studies:
        seeds = study["seeds"]
        lines += ["## " + study["name"], "",
                  "Common settings: `%s`; %d seeds." % (" ".join(study.get("set", [])), seeds), "",
                  "| variant | " + " | ".join(m[1] for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for v in study["variants"]:
            summaries = [s for st, name, _, _, s in rows if st == study["name"] and name == v["name"]]
            cells = []
            for column, _, decimals in METRICS:
                m, s = mean_std([x.get(column, float("nan")) for x in summaries])
                cells.append("%.*f ± %.*f" % (decimals, m, decimals, s))
            lines.append("| %s | %s |" % (v["name"], " | ".join(cells)))
        lines.append("")
        lines += paired_differences(study, rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    return rows


# Two-sided 95% critical values of Student's t for 1..10 degrees of freedom.
T_95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23]


def paired_differences(study, rows):
    """Final valid loss of each variant minus the first variant's, paired by seed (same batches),
    with the paired t statistic: is the difference larger than the seed noise?"""
    final = {}
    for st, name, seed, _, s in rows:
        if st == study["name"]:
            final.setdefault(name, {})[seed] = s["final_valid_loss"]
    first = study["variants"][0]["name"]
    seeds = sorted(final[first])
    if len(seeds) < 2 or len(study["variants"]) < 2:
        return []
    critical = T_95[min(len(seeds) - 1, len(T_95)) - 1]
    lines = ["Final valid loss minus `%s`'s, paired by seed (mean ± std of the %d differences); |t| > %.2f is a "
             "difference beyond the seed noise at 95%% (two-sided, %d degrees of freedom), and the 95%% interval "
             "is mean ± %.2f std / √%d:" % (first, len(seeds), critical, len(seeds) - 1, critical, len(seeds)), "",
             "| variant | per seed | mean ± std | 95% interval | t | beyond noise |", "|---|---|---|---|---|---|"]
    half_widths = []
    for v in study["variants"][1:]:
        diffs = [final[v["name"]][seed] - final[first][seed] for seed in seeds]
        m, s = mean_std(diffs)
        t = m / (s / math.sqrt(len(diffs))) if s > 0 else float("inf") * (1 if m >= 0 else -1)
        half = critical * s / math.sqrt(len(diffs))
        half_widths.append(half)
        lines.append("| %s | %s | %+.4f ± %.4f | [%+.3f, %+.3f] | %+.2f | %s |" % (
            v["name"], ", ".join("%+.3f" % d for d in diffs), m, s, m - half, m + half, t,
            "yes" if abs(t) > critical else "no"))
    # The seed-noise floor: a difference smaller than the interval's half-width cannot be told from noise.
    lines += ["", "Seed-noise floor of this study (half-width of the 95%% interval; median over variants, "
              "range): %.3f nats (%.3f to %.3f)." % (statistics.median(half_widths), min(half_widths), max(half_widths))]
    return lines + [""]


def gnuplot(script, workdir):
    p = subprocess.run(["gnuplot"], input=script, text=True, cwd=workdir, capture_output=True)
    if p.returncode != 0:
        fail("gnuplot failed: " + p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "gnuplot failed")


def plot(studies, rows, out):
    """Valid-loss curves (mean over seeds, error bars = std) and expert-load heatmaps, via gnuplot."""
    data_dir = os.path.join(out, "plot_data")
    os.makedirs(data_dir, exist_ok=True)
    for study in studies:
        curves = []
        for v in study["variants"]:
            summaries = [s for st, name, _, _, s in rows if st == study["name"] and name == v["name"]]
            steps = sorted(set.intersection(*[set(step for step, _ in s["valid_curve"]) for s in summaries]))
            data = os.path.join(data_dir, "%s_%s_valid.dat" % (study["name"], safe(v["name"])))
            with open(data, "w") as f:
                for step in steps:
                    m, s = mean_std([dict(x["valid_curve"])[step] for x in summaries])
                    f.write("%d %.6f %.6f\n" % (step, m, s))
            curves.append("'%s' using 1:2:3 with yerrorlines title '%s'" % (os.path.abspath(data), v["name"]))
            # Heatmap: final load per layer and expert, mean over seeds.
            layers = len(summaries[0]["final_load"])
            experts = len(summaries[0]["final_load"][0]) if layers else 0
            heat = os.path.join(data_dir, "%s_%s_load.dat" % (study["name"], safe(v["name"])))
            with open(heat, "w") as f:
                for l in range(layers):
                    f.write(" ".join("%.5f" % (sum(s["final_load"][l][e] for s in summaries) / len(summaries))
                                     for e in range(experts)) + "\n")
            png = os.path.abspath(os.path.join(out, "%s_load_%s.png" % (study["name"], safe(v["name"]))))
            gnuplot("\n".join([
                "set terminal pngcairo size 900,%d" % (160 + 40 * layers) if has_cairo() else
                "set terminal png size 900,%d" % (160 + 40 * layers),
                "set termoption noenhanced",  # variant names keep their underscores
                "set output '%s'" % png,
                "set title \"%s: share of routed pairs per expert, final evaluation, mean over %d seeds (uniform = %.3f)\"" %
                (v["name"], len(summaries), 1.0 / max(experts, 1)),
                "set xlabel 'expert'", "set ylabel 'MoE layer'", "set cblabel 'share'", "set ytics 1",
                "set yrange [-0.5:%f]" % (layers - 0.5), "set xrange [-0.5:%f]" % (experts - 0.5),
                "set palette defined (0 'white', 1 '#fdae61', 2 '#d7191c')",
                "plot '%s' matrix with image notitle" % os.path.abspath(heat), ""]), out)
        png = os.path.abspath(os.path.join(out, "%s_valid_loss.png" % study["name"]))
        gnuplot("\n".join([
            "set terminal pngcairo size 900,560" if has_cairo() else "set terminal png size 900,560",
            "set termoption noenhanced",  # variant names keep their underscores
            "set output '%s'" % png,
            "set title 'study %s: valid loss, mean over %d seeds (bars: std)'" % (study["name"], study["seeds"]),
            "set xlabel 'step'", "set ylabel 'valid loss'", "set key top right", "set grid",
            "plot " + ", ".join(curves), ""]), out)


_cairo = None


def has_cairo():
    global _cairo
    if _cairo is None:
        p = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
        _cairo = "pngcairo" in (p.stdout + p.stderr)
    return _cairo


def safe(name):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="*", help="study JSON files")
    parser.add_argument("--out", default="ablation", help="output directory (default: ablation)")
    parser.add_argument("--bin", default="build/yuanmoe", help="yuanmoe binary (default: build/yuanmoe)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="runs side by side, each with cores/jobs threads (default: one per core)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished run's checkpoints (default: delete them, ~0.7 GB a run)")
    parser.add_argument("--dry-run", action="store_true", help="check the studies and list the runs; train nothing")
    parser.add_argument("--name", help="an ad hoc study's name (instead of study files)")
    parser.add_argument("--base", help="ad hoc: the config every variant starts from")
    parser.add_argument("--seeds", type=int, default=3, help="ad hoc: seeds 1..S (default 3)")
    parser.add_argument("--set", action="append", help="ad hoc: KEY=VALUE for every variant (repeatable)")
    parser.add_argument("--variant", action="append",
                        help="ad hoc: NAME[:CONFIG.json][:KEY=VALUE,KEY=VALUE] (repeatable)")
    args = parser.parse_args()
    if args.jobs < 1:
        fail("--jobs must be >= 1")
    if not os.access(args.bin, os.X_OK):
        fail("%s: not an executable (build first, or pass --bin)" % args.bin)
    if not shutil.which("gnuplot"):
        fail("gnuplot not found, needed for the plots (Debian: apt-get install gnuplot-nox; scripts/setup.sh does)")
    studies = [load_study(p) for p in args.studies]
    if args.name:
        studies.append(study_from_args(args))
    if not studies:
        fail("no study given (a study JSON file, or --name/--base/--variant)")
    if len({s["name"] for s in studies}) != len(studies):
        fail("two studies share a name")
    os.makedirs(args.out, exist_ok=True)
    runs, members = plan_runs(studies, args.out)
    todo = [r for r in runs.values() if not os.path.exists(os.path.join(r["dir"], "summary.json"))]
    todo.sort(key=expected_cost, reverse=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print("ablate: %d runs, %d finished, %d to train (%d at a time, %d thread(s) each)"
          % (len(runs), len(runs) - len(todo), len(todo), args.jobs, threads), flush=True)
    if args.dry_run:
        for r in todo:
            print("ablate: would train %s seed %d (%s): --config %s %s" % (r["label"], r["seed"], r["key"], r["config"],
                                                                          " ".join("--set " + kv for kv in r["overrides"])))
        return
    started, failures = time.time(), []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train, r, args.bin, threads, args.keep_checkpoints) for r in todo]
        for future in concurrent.futures.as_completed(futures):
            run, error = future.result()
            status = "FAILED: " + error if error else "done"
            print("ablate: [%5.0f s] %s seed %d (%s): %s" % (time.time() - started, run["label"], run["seed"],
                                                          run["key"], status), flush=True)
            if error:
                failures.append(run)
    if failures:
        fail("%d run(s) failed; fix and re-run (finished runs are kept)" % len(failures))
    rows = write_results(studies, members, runs, args.out)
    plot(studies, rows, args.out)
    print("ablate: wrote %s/results.csv, %s/results.md and the plots (%.0f s)"
          % (args.out, args.out, time.time() - started))


if __name__ == "__main__":
    main()
