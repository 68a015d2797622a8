#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine that carries PyTorch 2.11 + CUDA 13, a
# compiler and CMake but no package registry (docs/cuda.md, "The GPU check"):
#   1. configure and build against that machine's torch (what it lacks comes from .gpu-bundle,
#      made here by scripts/gpu-bundle.sh and carried along),
#   2. the whole ctest suite (the CUDA tests run instead of skipping), then the CUDA tests alone,
#   3. `yuanmoe bench` on configs/gpu-bench.json: tokens/s, MFU against the stated bf16 dense peak,
#      memory, the breakdown,
#   4. the eager PyTorch reference on the same GPU and config,
# and writes OUT_DIR/report.md and OUT_DIR/report.json (bench/gpu_report.py), bench.json,
# eager.json and logs.tar.gz (every log of the run).
# Each step prints a progress line; a failing step is reported and the next one still runs.
# Sized to finish within 8 minutes on 16 cores.
# usage: scripts/gpu-check.sh OUT_DIR [PYTHON]     (PYTHON: the interpreter whose torch to use)
# A dry run on a CPU machine: GPU_CHECK_CONFIG=configs/tiny-m32.json GPU_CHECK_DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [PYTHON]}
mkdir -p "$out" && out=$(cd "$out" && pwd)
python=${2:-$(command -v python3)}
config=${GPU_CHECK_CONFIG:-configs/gpu-bench.json}
eager_device=${GPU_CHECK_DEVICE:-cuda}
start=$(date +%s)
progress() { echo "[gpu-check +$(($(date +%s) - start))s] $*" >&2; }
status() { echo "$1 $2 $(($(date +%s) - $3))" >> "$out/steps.txt"; }
: > "$out/steps.txt"
run_step() {  # run_step NAME LOG COMMAND...: runs it, logs it, records rc and seconds
  local name=$1 log=$2 began
  shift 2
  began=$(date +%s)
  progress "$name ..."
  "$@" > "$out/$log" 2>&1
  local rc=$?
  status "$name" "$rc" "$began"
  progress "$name: exit $rc in $(($(date +%s) - began)) s (log: $log)"
  return $rc
}

{ nvidia-smi; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; nproc; } > "$out/machine.txt" 2>&1
progress "$(tail -2 "$out/machine.txt" | head -1)"

generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
[ -d .gpu-bundle ] || progress "no .gpu-bundle here: the build needs the system's packages (scripts/gpu-bundle.sh)"
run_step configure configure.log cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DYUANMOE_PYTHON="$python"
run_step build build.log cmake --build build-gpu -j "$(nproc)"
if [ -x build-gpu/yuanmoe ]; then
  (cd build-gpu && run_step ctest ctest.log ctest -j 8 --timeout 240 --output-on-failure)
  run_step cuda-tests cuda-tests.log build-gpu/tests/yuanmoe_model_tests --gtest_filter='CudaTest.*'
  run_step bench bench.log build-gpu/yuanmoe bench --config "$config" --steps 5 --warmup 2 \
    --repeats 5 --json "$out/bench.json"
  run_step eager eager.log env PYTHONUNBUFFERED=1 "$python" bench/pytorch_eager_step.py \
    --config "$config" --steps 3 --warmup 1 --device "$eager_device" --json "$out/eager.json"
fi
"$python" bench/gpu_report.py "$out" "$config" && progress "report: $out/report.md"
# Few files come back from a device machine (at most 8): the logs travel as one archive.
(cd "$out" && tar czf logs.tar.gz ./*.log ./*.txt && rm -f ./*.log ./*.txt)
progress "done in $(($(date +%s) - start)) s: $(cd "$out" && echo *)"
