#!/usr/bin/env python3
"""Expert parallelism and the sharded optimizer through the real binary, over Gloo, against one
process (docs/parallelism.md).

configs/tiny-m32.json (32 experts, top-2, attention router, aux loss), its vocabulary cut to the
synthetic corpus's and its micro-batches to 2 sequences (so that dp=4 divides the batch), trains
20 steps in every layout with train.precision = fp64; the logged losses must equal the
one-process run's within 1e-5 and the routed-pair counts of every layer (metrics.jsonl's
expert_load times the step's pairs) must be equal:
  dp=2 ep=2, dp=2 with parallel.shard_optimizer, pp=2 x dp=2 ep=2 with the sharded optimizer,
  dp=2 ep=2 with train.recompute (the all-to-alls rerun inside the backward).
Why fp64: in fp32 any two layouts (plain dp=2 too) sum in another order, and top-k routing turns
a last-bit difference into a different expert for some token within a few steps; from then on
the curves drift apart by 1e-4..1e-1 (docs/parallelism.md). In fp64 the same layouts agree to
about 1e-14, so the check can be strict.
Resharding: 10 steps at dp=4 ep=2 (sharded) then 10 at dp=2 ep=1, at 1 process, and at pp=2;
and 10 at 1 process then 10 at dp=4 ep=2 sharded; each must end on the one-process curve with
final weights equal within the same tolerance. In fp32: dp=2 with the sharded optimizer equals
dp=2 without it bit for bit, and the AdamW state each rank logs halves. Failure: kill -9 one rank
of a dp=2 ep=2 run; its peer exits non-zero with one line naming itself, and the re-run resumes.

usage: python3 test_expert_parallel.py BUILD_DIR/yuanmoe
"""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from harness import Checks, write_corpus  # noqa: E402

BIN = os.path.abspath(sys.argv[1])
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "tiny-m32.json")
WORK = tempfile.mkdtemp(prefix="yuanmoe-ep-")
check = Checks()
STEPS = 20
TOLERANCE = 1e-5


def run(args, expect_ok=True, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(args, cwd=WORK, capture_output=True, text=True, env=env, timeout=timeout)
    if expect_ok and p.returncode != 0:
        raise SystemExit("FAIL: %s exited %d\n%s%s" % (" ".join(args), p.returncode, p.stdout[-3000:], p.stderr[-3000:]))
    return p


def prepare():
    write_corpus(os.path.join(WORK, "corpus.txt"), documents=600)
    run([BIN, "prepare-data", "--input", "corpus.txt", "--output", "data/corpus", "--train-tokenizer", "300",
         "--valid-fraction", "0.1"])


def train(run_dir, nproc=1, pp=1, ep=1, shard=False, precision="fp64", extra=()):
    args = ["train", "--config", CONFIG, "--run-dir", run_dir,
            # Micro-batches of 2 in every layout: the aux loss is a function of each micro-batch.
            "--set", "model.vocab_size=300", "--set", "train.micro_batch_size=2", "--set", "train.max_steps=%d" % STEPS,
            "--set", "train.warmup_steps=5", "--set", "train.eval_interval=10", "--set", "checkpoint.interval=10",
            "--set", "log.interval=1", "--set", "log.progress=false", "--set", "log.plots=false",
            "--set", "log.peak_tflops=1", "--set", "parallel.timeout_s=60",
            "--set", "parallel.pipeline_parallel_size=%d" % pp, "--set", "parallel.expert=%d" % ep,
            "--set", "parallel.shard_optimizer=%s" % ("true" if shard else "false"),
            "--set", "train.precision=" + precision, *extra]
    if nproc == 1:
        return run([BIN, *args])
    return run([BIN, "launch", "--nproc", str(nproc), "--", *args])


def records(run_dir, split=None):
    out = {}
    with open(os.path.join(WORK, run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == split:
                out[record["step"]] = record
    return out


def routed_pairs(record):
    # expert_load: fractions of the step's routed pairs per layer and expert (tokens x top-2).
    pairs = 8 * 256 * 2
    return [[round(f * pairs) for f in layer] for layer in record["expert_load"]]


def compare(name, run_dir, reference, first_step=1, tolerance=TOLERANCE):
    got, want = records(run_dir), records(reference)
    steps = [s for s in sorted(want) if s >= first_step]
    diff = max(abs(got[s]["loss"] - want[s]["loss"]) for s in steps) if all(s in got for s in steps) else float("inf")
    counts_equal = all(s in got and routed_pairs(got[s]) == routed_pairs(want[s]) for s in steps)
    check(diff <= tolerance and counts_equal,
          "%s: %d losses max |diff| %.1e (<= %.0e), routed-pair counts %s"
          % (name, len(steps), diff, tolerance, "equal" if counts_equal else "DIFFER"))
    return diff


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in ("F32", "F64"):
            continue
        begin, end = info["data_offsets"]
        code, size = ("f", 4) if info["dtype"] == "F32" else ("d", 8)
        out[name] = struct.unpack("<%d%s" % ((end - begin) // size, code), data[begin:end])
    return out


def final_tensors(run_dir, kind):
    step_dir = os.path.join(WORK, run_dir, "checkpoints", "step_%08d" % STEPS)
    tensors = {}
    for file in sorted(os.listdir(step_dir)):
        if file.startswith(kind + "-stage-"):
            tensors.update(read_safetensors(os.path.join(step_dir, file)))
    return tensors


def compare_weights(name, run_dir, reference):
    got, want = final_tensors(run_dir, "model"), final_tensors(reference, "model")
    same_names = sorted(got) == sorted(want)
    diff = max((max(abs(a - b) for a, b in zip(got[k], want[k])) for k in want if k in got), default=float("inf"))
    check(same_names and diff <= TOLERANCE,
          "%s: final weights, %d tensors by global name, max |diff| %.1e" % (name, len(want), diff))


def memory_line(run_dir, rank):
    """(parameters, AdamW state, inspect's parameters, inspect's state) bytes from rank's log."""
    log = os.path.join(WORK, run_dir, "train.log" if rank == 0 else "train.rank%d.log" % rank)
    with open(log) as f:
        m = re.search(r"memory on rank %d: parameters (\d+) bytes, AdamW state (\d+) bytes"
                      r"(?: \(inspect: parameters (\d+) bytes, AdamW state (\d+) bytes\))?" % rank, f.read())
    return tuple(int(g) if g else None for g in m.groups()) if m else (None,) * 4


def check_memory_matches_inspect(name, run_dir, ranks):
    for rank in range(ranks):
        params, state, planned_params, planned_state = memory_line(run_dir, rank)
        ok = params is not None and planned_params == params and planned_state and abs(state / planned_state - 1) < 1e-3
        check(ok, "%s rank %d: measured parameters %s bytes, AdamW state %s; inspect %s, %s"
              % (name, rank, params, state, planned_params, planned_state))


def kill_one_rank():
    args = ["train", "--config", CONFIG, "--run-dir", "run_kill", "--set", "model.vocab_size=300",
            "--set", "train.max_steps=40", "--set", "checkpoint.interval=5", "--set", "log.interval=1",
            "--set", "log.progress=false",
            "--set", "log.plots=false", "--set", "log.peak_tflops=1", "--set", "parallel.timeout_s=20",
            "--set", "parallel.expert=2"]
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        log = open(os.path.join(WORK, "kill.%d.log" % rank), "w+")
        procs.append(subprocess.Popen([BIN, *args], cwd=WORK, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    latest = os.path.join(WORK, "run_kill", "checkpoints", "latest")
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(latest) and procs[1].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        code = procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        code = None
    seconds = time.time() - killed_at
    logs[0].seek(0)
    error_lines = [l for l in logs[0].read().splitlines() if "error" in l]
    names_group = bool(error_lines) and re.search(r"over the \w+ group of ranks (0, 1|1, 0)", error_lines[0])
    check(code not in (0, None) and len(error_lines) == 1 and "rank 0 of 2" in error_lines[0] and names_group,
          "kill -9 rank 1 of dp=2 ep=2: rank 0 exits %s after %.1f s with one line naming the group it lost: %s"
          % (code, seconds, (error_lines or ["<none>"])[0][:200]))
    reached = max(records("run_kill"), default=0)
    run([BIN, "launch", "--nproc", "2", "--", *args])
    final = max(records("run_kill"), default=0)
    check(0 < reached < 40 and final == 40,
          "the killed run stopped at step %d; the re-run resumed and reached step %d of 40" % (reached, final))


def main():
    try:
        prepare()
        train("single")
        train("dp2_ep2", nproc=2, ep=2)
        compare("dp=2 ep=2 vs 1 process", "dp2_ep2", "single")
        train("dp2_sharded", nproc=2, shard=True)
        compare("dp=2 sharded optimizer vs 1 process", "dp2_sharded", "single")
        train("pp2_dp2_ep2", nproc=4, pp=2, ep=2, shard=True)
        compare("pp=2 x dp=2 ep=2 sharded vs 1 process", "pp2_dp2_ep2", "single")
        train("dp2_ep2_recompute", nproc=2, ep=2, extra=["--set", "train.recompute=true"])
        compare("dp=2 ep=2 with train.recompute vs 1 process", "dp2_ep2_recompute", "single")

        # fp32, as users train: sharding changes no bit, and halves the state.
        train("dp2_fp32", nproc=2, precision="fp32")
        train("dp2_sharded_fp32", nproc=2, shard=True, precision="fp32")
        compare("fp32: dp=2 sharded optimizer vs dp=2 replicated", "dp2_sharded_fp32", "dp2_fp32", tolerance=0.0)
        for rank in (0, 1):
            replicated, sharded = memory_line("dp2_fp32", rank)[1], memory_line("dp2_sharded_fp32", rank)[1]
            check(replicated and sharded and abs(sharded / replicated - 0.5) < 0.01,
                  "fp32: AdamW state on rank %d at dp=2: %s bytes replicated, %s sharded (ratio %.4f)"
                  % (rank, replicated, sharded, (sharded or 0) / (replicated or 1)))

        # Resharding round trips: a checkpoint written in one layout resumed in another.
        half = ["--exit-after-steps", str(STEPS // 2)]
        for target, nproc, pp, ep in (("dp2", 2, 1, 1), ("single", 1, 1, 1), ("pp2", 2, 2, 1)):
            run_dir = "dp4_ep2_then_" + target
            train(run_dir, nproc=4, ep=2, shard=True, extra=half)
            train(run_dir, nproc=nproc, pp=pp, ep=ep)
            compare("saved at dp=4 ep=2 sharded, resumed at %s" % target, run_dir, "single", first_step=STEPS // 2 + 1)
            compare_weights("saved at dp=4 ep=2 sharded, resumed at %s" % target, run_dir, "single")
        train("single_then_dp4_ep2", extra=half)
        train("single_then_dp4_ep2", nproc=4, ep=2, shard=True)
        compare("saved at 1 process, resumed at dp=4 ep=2 sharded", "single_then_dp4_ep2", "single",
                first_step=STEPS // 2 + 1)
        compare_weights("saved at 1 process, resumed at dp=4 ep=2 sharded", "single_then_dp4_ep2", "single")
        check_memory_matches_inspect("fp32 dp=2", "dp2_fp32", 2)
        check_memory_matches_inspect("fp32 dp=2 sharded", "dp2_sharded_fp32", 2)
        kill_one_rank()
        check_memory_matches_inspect("fp32 dp=2 ep=2", "run_kill", 2)
    finally:
        code = check.finish(WORK)
    return code


if __name__ == "__main__":
    sys.exit(main())
