"""Shared by the multi-rank measurements (bench/expert_parallel_cost.py, bench/grad_reduce_overlap.py):
configs/tiny-m32.json trained under `yuanmoe launch` on the CPU, one thread per rank, with
micro-batches of 2 (so that dp=4 divides the batch of 8), no evaluation between steps, no
checkpoints, plots or progress bar, and every rank's train.log read back."""

import os
import subprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def launch_tiny_m32(binary, run_dir, nproc, steps, overrides):
    """Trains `steps` steps at `nproc` ranks with `overrides` (["key=value", ...]); returns every
    rank's train.log text, rank 0 first."""
    args = ["train", "--config", os.path.join(ROOT, "configs", "tiny-m32.json"), "--run-dir", run_dir]
    for override in ["train.micro_batch_size=2", "train.max_steps=%d" % steps, "train.eval_interval=0",
                     "checkpoint.interval=0", "log.progress=false", "log.plots=false", "log.peak_tflops=1",
                     *overrides]:
        args += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([binary, "launch", "--nproc", str(nproc), "--", *args], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    logs = []
    for rank in range(nproc):
        with open(os.path.join(run_dir, "train.log" if rank == 0 else "train.rank%d.log" % rank)) as f:
            logs.append(f.read())
    return logs
