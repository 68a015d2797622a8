#!/usr/bin/env bash
# The GPU check: everything a short turn on a lent GPU machine should produce, in one command
# (docs/cuda.md, "The GPU check"). The machine carries PyTorch 2.11 + CUDA 13, a compiler, CMake
# and ninja but no package registry; what it lacks comes from .gpu-bundle (scripts/gpu-bundle.sh).
#
# usage: scripts/gpu-check.sh OUT_DIR [PYTHON]
#   PYTHON   the interpreter whose torch to build against and run with (default: python3 on PATH),
#            made absolute; its bin/ goes first on PATH (cmake and ninja from pip live there)
# environment:
#   GPU_CHECK_DEADLINE  seconds for the whole run (default 480); each stage runs under `timeout`
#                       of at most its own cap and what is left, less a reserve for the last report
#   GPU_CHECK_DEVICE    cuda (default), or cpu for a rehearsal on a machine without a GPU
#   GPU_CHECK_CONFIG    the bench config (default configs/gpu-bench.json)
#   GPU_CHECK_JOBS      build jobs (default: nproc)
#   GPU_CHECK_CAP_SCALE every stage's own time cap times this (default 1: caps sized for 16 cores;
#                       a rehearsal on 2 cores gives 10)
#
# Stages, most informative first, each skipped with its reason when one it needs did not pass:
#   preflight      python, torch, CUDA, GPU, nvcc, g++, cmake, ninja, nccl.h
#   configure      build-gpu/ against PYTHON's torch (every package's *_DIR in its log)
#   build-device   the yuanmoe binary and yuanmoe_device_tests (CUDA, NCCL, host syncs)
#   device-tests   that binary: CUDA against the CPU, NCCL on cuda:0, the step under sync debug
#   bench          yuanmoe bench on GPU_CHECK_CONFIG -> bench.json
#   eager          bench/pytorch_eager_step.py on the same config and device -> eager.json
#   profile        one step under bench --profile, summed by bench/profile_step.py (kernels per name)
#   build-rest     every other target
#   ctest          the rest of the suite on the device; tests that force the CPU, need gnuplot
#                  where it is missing, or only replay fuzz inputs are left to CI (named in the report)
# After every stage OUT_DIR holds report.md, report.json and logs.tar.gz (all logs), and bench.json
# and eager.json once made: at most 5 files, however early the run is killed. The last lines on
# stdout are the summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [PYTHON]}
mkdir -p "$out" && out=$(cd "$out" && pwd)
python_arg=${2:-python3}
deadline_s=${GPU_CHECK_DEADLINE:-480}
device=${GPU_CHECK_DEVICE:-cuda}
config=${GPU_CHECK_CONFIG:-configs/gpu-bench.json}
jobs=${GPU_CHECK_JOBS:-$(nproc)}
cap_scale=${GPU_CHECK_CAP_SCALE:-1}
reserve_s=15   # kept back for the last report and archive
start=$(date +%s)
build=$repo/build-gpu
logs=$build/gpu-check   # every log; OUT_DIR gets them as one archive
mkdir -p "$logs" && rm -f "$logs"/*

say() { echo "[gpu-check +$(($(date +%s) - start))s] $*" >&2; }

# An absolute path that keeps a virtual environment's own bin/ (no symlink resolution).
if [[ $python_arg == */* ]]; then
  python=$(cd "$(dirname "$python_arg")" 2>/dev/null && pwd)/$(basename "$python_arg")
else
  python=$(command -v "$python_arg" || true)
fi
if [ ! -x "$python" ]; then
  say "no Python interpreter at '$python_arg'"
  python=python3
fi
export PATH="$(dirname "$python"):$PATH"
: > "$logs/stages.tsv"   # stage, status, seconds, note

# The report (bench/gpu_report.py) and the log archive, rewritten into OUT_DIR atomically, one
# writer at a time (the heartbeat below is the other).
publish() {
  (
    command -v flock > /dev/null && flock 9
    "$python" "$repo/bench/gpu_report.py" "$logs" "$out" "$config" > "$logs/report.log" 2>&1 ||
      echo "gpu-check: the report failed: $(tail -1 "$logs/report.log")" >&2
    tar czf "$out/.logs.tar.gz.part" -C "$logs" . 2> /dev/null && mv -f "$out/.logs.tar.gz.part" "$out/logs.tar.gz"
  ) 9> "$logs/.lock"
}

# Rewrites the report every 30 s while a stage runs: a kill mid-stage loses at most 30 s of log.
heartbeat() {
  while sleep 30; do publish; done
}

left() { echo $((deadline_s - ($(date +%s) - start) - reserve_s)); }

declare -A status   # stage -> passed | failed | timeout | skipped
record() {  # record STAGE STATUS SECONDS NOTE
  status[$1]=$2
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$logs/stages.tsv"
  publish
}

# stage NAME CAP_S NEEDS COMMAND...: runs COMMAND (log: NAME.log) under timeout, unless a stage
# in NEEDS (space-separated) did not pass or no time is left.
stage() {
  local name=$1 cap=$2 needs=$3 need
  shift 3
  for need in $needs; do
    if [ "${status[$need]:-}" != passed ]; then
      record "$name" skipped 0 "$need ${status[$need]:-not run}"
      say "$name: skipped ($need ${status[$need]:-not run})"
      return
    fi
  done
  local budget
  budget=$(left)
  cap=$((cap * cap_scale))
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -lt 10 ]; then
    record "$name" skipped 0 "no time left of the ${deadline_s} s deadline"
    say "$name: skipped (no time left)"
    return
  fi
  local shown="$*"
  [ ${#shown} -gt 300 ] && shown="${shown:0:300}..."
  echo "\$ $shown (limit ${budget} s)" > "$logs/$name.log"
  printf '%s\trunning\t%s\tlimit %s s\n' "$name" "$(date +%s)" "$budget" > "$logs/current.tsv"  # its start
  say "$name (limit ${budget} s) ..."
  local began rc seconds result
  began=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" >> "$logs/$name.log" 2>&1
  rc=$?
  seconds=$(($(date +%s) - began))
  rm -f "$logs/current.tsv"
  case $rc in
    0) result=passed ;;
    124 | 137) result=timeout ;;
    *) result=failed ;;
  esac
  record "$name" "$result" "$seconds" "exit $rc"
  say "$name: $result in $seconds s (exit $rc)"
}

preflight() {
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo) memory"
  echo "repository: $repo ($(git -C "$repo" rev-parse --short HEAD 2> /dev/null || echo 'no git'))"
  echo "python: $python ($("$python" --version 2>&1))"
  "$python" - << 'PY'
import os, torch
print("torch:", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
      "NCCL", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-")
print("torch cmake prefix:", torch.utils.cmake_prefix_path)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU: %s, %d GPU(s), %.0f GiB, capability %d.%d, %d SMs" % (
        p.name, torch.cuda.device_count(), p.total_memory / 2**30, p.major, p.minor, p.multi_processor_count))
else:
    print("GPU: none visible to torch")
site = os.path.dirname(os.path.dirname(torch.__file__))
wheel = os.path.join(site, "nvidia", "nccl", "include", "nccl.h")
print("wheel nccl.h:", wheel if os.path.exists(wheel) else "absent")
PY
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader
  local tool version
  for tool in nvcc g++ cmake ninja; do
    version=$($tool --version 2> /dev/null | grep -m1 -iE 'release|version|[0-9]+\.[0-9]+' || true)
    printf '%s: %s (%s)\n' "$tool" "$(command -v $tool || echo 'not found')" "$version"
  done
  local nccl=""
  for dir in /usr/include /usr/local/include /usr/local/cuda/include; do
    [ -f "$dir/nccl.h" ] && nccl="$nccl $dir/nccl.h"
  done
  echo "system nccl.h:${nccl:- none (the build takes the one of the torch wheel)}"
  echo "gnuplot: $(command -v gnuplot || echo 'not found (Plots.* and python.ablate are left to CI)')"
  if [ -d "$repo/.gpu-bundle" ]; then echo ".gpu-bundle: $(ls "$repo/.gpu-bundle" | tr '\n' ' ')"
  else echo ".gpu-bundle: absent (the build needs every package on this machine)"; fi
  [ "$device" = cpu ] || "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "GPU_CHECK_DEVICE=$device but torch sees no GPU"; return 1; }
}

# Left to CI: tests that force the CPU (their processes hide the GPU), need gnuplot where it is
# missing, or only replay fuzz inputs; the golden losses are this CPU kind's bits (CI runs them); the
# device tests run in their own stage.
left_to_ci='^python\.(parallel|expert_parallel)$'
command -v gnuplot > /dev/null || left_to_ci="$left_to_ci|^Plots\.|^python\.ablate$"
printf '%s\n' "$left_to_ci" > "$logs/left-to-ci.txt"
heartbeat &
heartbeat_pid=$!
trap 'kill $heartbeat_pid 2> /dev/null' EXIT

say "deadline ${deadline_s} s, device $device, config $config, $jobs jobs, python $python"
stage preflight 30 "" bash -c "$(declare -f preflight); $(declare -p python repo device); preflight"

generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
stage configure 90 "" cmake -S "$repo" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DYUANMOE_BUILD_TESTS=ON -DYUANMOE_PYTHON="$python"
stage build-device 300 configure cmake --build "$build" -j "$jobs" --target yuanmoe yuanmoe_device_tests
stage device-tests 150 build-device env OMP_NUM_THREADS="$jobs" "$build/tests/yuanmoe_device_tests" \
  --gtest_output="xml:$logs/device-tests.xml"
stage bench 180 build-device "$build/yuanmoe" bench --config "$config" --steps 5 --warmup 2 --repeats 5 \
  --json "$logs/bench.json"
stage eager 150 preflight env PYTHONUNBUFFERED=1 "$python" bench/pytorch_eager_step.py --config "$config" \
  --steps 3 --warmup 1 --device "$device" --json "$logs/eager.json"
# The trace stays in build-gpu/ (tens of MB with the kernels); its sums go to profile.log.
stage profile 120 build-device bash -c '"$1" bench --config "$2" --step-only --steps 2 --warmup 2 \
  --profile "$3/trace.json" && "$4" bench/profile_step.py "$3/trace.json" --top 30' \
  profile "$build/yuanmoe" "$config" "$build" "$python"
stage build-rest 400 build-device cmake --build "$build" -j "$jobs"

ctest_jobs=$((jobs >= 16 ? 8 : (jobs >= 2 ? jobs : 1)))
stage ctest 900 build-rest env OMP_NUM_THREADS=$((jobs / ctest_jobs > 0 ? jobs / ctest_jobs : 1)) \
  ctest --test-dir "$build" -j "$ctest_jobs" --timeout 240 --output-on-failure -LE '^(device|fuzz|golden)$' -E "$left_to_ci"

kill $heartbeat_pid 2> /dev/null
wait $heartbeat_pid 2> /dev/null
publish
say "done in $(($(date +%s) - start)) s; OUT_DIR holds: $(cd "$out" && ls | tr '\n' ' ')"
cat "$logs/summary.txt" 2> /dev/null
