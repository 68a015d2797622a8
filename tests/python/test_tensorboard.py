#!/usr/bin/env python3
"""The TensorBoard event files of `yuanmoe train`, read back with TensorBoard's own reader
(tensorboard.backend.event_processing.EventAccumulator, the project environment's tensorboard):
every tag's steps and values equal metrics.jsonl's; a run resumed after logging steps past its
last checkpoint shows each step once; a truncated or corrupted event file is read the way
TensorBoard reads one, and does not stop a resume; an unwritable tensorboard directory costs
one warning line, not the run.

usage: python3 test_tensorboard.py BUILD_DIR/yuanmoe
"""

import glob
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "support"))
from harness import Checks, prepare_data, tiny_config  # noqa: E402

from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

BIN = os.path.abspath(sys.argv[1])
WORK = tempfile.mkdtemp(prefix="yuanmoe-tensorboard-")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
check = Checks()
STEPS = 6


def train(run_dir, *settings, expect_ok=True):
    p = subprocess.run([BIN, "train", "--config", "base.json", "--run-dir", run_dir, *settings], cwd=WORK,
                       capture_output=True, text=True, env=ENV, timeout=600)
    if expect_ok and p.returncode != 0:
        raise SystemExit("FAIL: train %s exited %d\n%s" % (run_dir, p.returncode, p.stderr[-2000:]))
    return p


def prepare():
    prepare_data(BIN, WORK)
    plots = shutil.which("gnuplot") is not None
    config = tiny_config(checkpoint={"interval": 3, "keep_last": 3},
                         log={"interval": 1, "progress": False, "plots": plots, "peak_tflops": 1}, max_steps=STEPS)
    with open(os.path.join(WORK, "base.json"), "w") as f:
        json.dump(config, f)


class Reports(logging.Handler):
    """The messages TensorBoard's event file loader logs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def read_events(directory):
    """TensorBoard's reader on a run's event files: {tag: [(step, value), ...]}, histograms, images."""
    acc = event_accumulator.EventAccumulator(directory, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    histograms = {t: acc.Histograms(t) for t in tags["histograms"]}
    images = {t: acc.Images(t) for t in tags["images"]}
    return scalars, histograms, images


def metrics(run_dir):
    with open(os.path.join(WORK, run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def expected_scalars(lines):
    """What docs/training.md ("TensorBoard") says each metrics.jsonl line gives."""
    want = {}
    for line in lines:
        step = line["step"]

        def put(tag, value):
            want.setdefault(tag, []).append((step, value))
        if line.get("split") == "valid":
            put("valid/loss", line["loss"])
            put("valid/perplexity", line["perplexity"])
            for key in ("load_cv", "experts_under_1pct", "router_entropy", "active_experts", "router_ties",
                        "router_exact_ties"):
                for layer, value in enumerate(line[key]):
                    put("moe/layer_%02d/%s" % (layer, key), value)
        else:
            put("train/loss", line["loss"] + line["aux_loss"])
            put("train/lm_loss", line["loss"])
            put("train/aux_loss", line["aux_loss"])
            for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "skipped_steps", "peak_rss_mib"):
                put("train/" + key, line[key])
    return want


def compare(scalars, lines, what):
    want = expected_scalars(lines)
    check(sorted(scalars) == sorted(want), "%s: the reader's scalar tags are metrics.jsonl's (%d tags; extra %s, "
          "missing %s)" % (what, len(scalars), sorted(set(scalars) - set(want)), sorted(set(want) - set(scalars))))
    bad = []
    for tag, points in want.items():
        got = scalars.get(tag, [])
        # Scalars travel as float32 (Summary.Value.simple_value).
        if [s for s, _ in got] != [s for s, _ in points] or not all(
                math.isclose(g, w, rel_tol=2e-7, abs_tol=1e-30) for (_, g), (_, w) in zip(got, points)):
            bad.append(tag)
    check(not bad, "%s: every tag's steps and values equal metrics.jsonl's to float32 rounding (differ: %s)" %
          (what, bad[:5]))


def main():
    prepare()
    # 1. A straight run: tags, steps and values against metrics.jsonl; histograms; the heatmap.
    train("straight")
    files = glob.glob(os.path.join(WORK, "straight", "tensorboard", "events.out.tfevents.*"))
    check(len(files) == 1, "one event file per process start in RUN_DIR/tensorboard: %s" % [os.path.basename(f) for f in files])
    scalars, histograms, images = read_events(os.path.join(WORK, "straight", "tensorboard"))
    lines = metrics("straight")
    compare(scalars, lines, "straight run")
    check([s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1)), "train/loss at steps 1..%d" % STEPS)
    check([s for s, _ in scalars["valid/loss"]] == [0, 3, 6], "valid/loss at steps 0, 3, 6")
    final_eval = [l for l in lines if l.get("split") == "valid"][-1]
    for layer, load in enumerate(final_eval["expert_load"]):
        h = histograms.get("moe/layer_%02d/expert_share" % layer)
        ok = h is not None and [e.step for e in h] == [0, 3, 6]
        if ok:
            v = h[-1].histogram_value
            ok = (v.num == len(load) and math.isclose(v.sum, sum(load), rel_tol=1e-9) and
                  math.isclose(v.min, min(load)) and math.isclose(v.max, max(load)) and sum(v.bucket) == len(load))
        check(ok, "moe/layer_%02d/expert_share: a histogram of the %d shares at each evaluation" % (layer, len(load)))
    if shutil.which("gnuplot"):
        heat = images.get("moe/expert_load", [])
        check(len(heat) >= 1 and heat[-1].encoded_image_string.startswith(b"\x89PNG") and heat[-1].width > 0,
              "moe/expert_load: the plots' heatmap as a PNG image (%d)" % len(heat))

    # 2. Resumed after logging steps past its last checkpoint (what a kill -9 leaves): TensorBoard
    # shows each step once, with the resumed run's values.
    shutil.copytree(os.path.join(WORK, "straight"), os.path.join(WORK, "resumed"))
    shutil.rmtree(os.path.join(WORK, "resumed", "checkpoints", "step_%08d" % STEPS))
    p = train("resumed")
    check("resumed from" in p.stderr and "step 3" in p.stderr, "the copy resumes from step 3")
    files = glob.glob(os.path.join(WORK, "resumed", "tensorboard", "events.out.tfevents.*"))
    check(len(files) == 2, "a second event file for the second process start (%d)" % len(files))
    scalars, _, _ = read_events(os.path.join(WORK, "resumed", "tensorboard"))
    compare(scalars, metrics("resumed"), "resumed run")
    steps = [s for s, _ in scalars["train/loss"]]
    check(steps == list(range(1, STEPS + 1)), "resumed: train/loss has each step once: %s" % steps)

    # 3. A truncated last record (a kill mid-write) and a corrupted byte: TensorBoard's reader
    # keeps what precedes them (as it reads any event file), and a resume over them runs.
    whole = sum(len(v) for v in read_events(os.path.join(WORK, "straight", "tensorboard"))[0].values())
    for kind in ("truncated", "corrupted"):
        run = kind
        shutil.copytree(os.path.join(WORK, "straight"), os.path.join(WORK, run))
        (path,) = glob.glob(os.path.join(WORK, run, "tensorboard", "events.out.tfevents.*"))
        data = bytearray(open(path, "rb").read())
        if kind == "truncated":
            data = data[:len(data) - 7]
        else:
            data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
        reports = Reports()
        loader_log = logging.getLogger("tensorboard")  # tensorboard.util.tb_logging's logger
        loader_log.addHandler(reports)
        loader_log.setLevel(logging.DEBUG)
        try:
            scalars, _, _ = read_events(os.path.join(WORK, run, "tensorboard"))
            read = sum(len(v) for v in scalars.values())
            # The truncated record is the last one (an image or a histogram): every scalar precedes it.
            check(0 < read < whole or (kind == "truncated" and read == whole),
                  "%s event file: the reader keeps %d of the %d scalar points, those before the damage" %
                  (kind, read, whole))
        except Exception as e:  # noqa: BLE001
            check(False, "%s event file: the reader raised %r" % (kind, e))
        finally:
            loader_log.removeHandler(reports)
        damaged = [m for m in reports.messages if "Truncated record" in m]
        check(len(damaged) == 1, "%s event file: TensorBoard's loader reports it as it reports any damaged record: %s" %
              (kind, damaged))
        shutil.rmtree(os.path.join(WORK, run, "checkpoints", "step_%08d" % STEPS))
        p = train(run, expect_ok=False)
        check(p.returncode == 0, "%s event file: a resume over it runs to the end (exit %d)" % (kind, p.returncode))

    # 4. An unwritable tensorboard directory (a regular file in its way): one warning, the run goes on.
    os.makedirs(os.path.join(WORK, "blocked"))
    open(os.path.join(WORK, "blocked", "tensorboard"), "w").write("not a directory\n")
    p = train("blocked", expect_ok=False)
    warnings = [l for l in p.stderr.splitlines() if "TensorBoard" in l]
    check(p.returncode == 0 and len(warnings) == 1 and "blocked/tensorboard" in warnings[0],
          "unwritable tensorboard directory: exit %d and one warning naming it: %s" % (p.returncode, warnings))
    check(len(metrics("blocked")) == len(lines), "... and metrics.jsonl complete (%d lines)" % len(metrics("blocked")))

    # 5. log.tensorboard = false writes nothing.
    train("off", "--set", "log.tensorboard=false")
    check(not os.path.exists(os.path.join(WORK, "off", "tensorboard")), "log.tensorboard=false: no tensorboard/")
    return check.finish(WORK)


if __name__ == "__main__":
    sys.exit(main())
