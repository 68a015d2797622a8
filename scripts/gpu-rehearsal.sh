#!/usr/bin/env bash
# scripts/gpu-check.sh rehearsed on this CPU machine, in an environment that imitates the GPU
# machine (docs/cuda.md, "Rehearsing the GPU check"), so that its first real run is not where its
# bugs are found:
#   - a private mount and PID namespace in which every file .gpu-bundle carries is hidden from
#     /usr (overlay whiteouts: those Debian packages' headers, libraries, CMake and pkg-config
#     files are gone), as are the system's cmake, ctest, ninja and gnuplot, and the project's own
#     Python environment (scripts/venv.sh);
#   - torch, cmake and ninja from another Python environment at another path, as on the GPU
#     machine (GPU_REHEARSAL_VENV, default /opt/torch/.venv; made here on first use, about 3 GB
#     from PyPI);
#   - the toolkit's nccl.h hidden too, so the build takes the wheel's, as where a toolkit lacks it;
#   - GPU_CHECK_DEVICE=cpu and GPU_CHECK_CONFIG=configs/tiny-m32.json (no GPU here), and a
#     deadline and stage caps sized for 2 cores (GPU_CHECK_DEADLINE 5400 s, GPU_CHECK_CAP_SCALE 10).
# usage: scripts/gpu-rehearsal.sh OUT_DIR [KILL_AFTER_S]
#   KILL_AFTER_S: kill the whole check that many seconds in, as a device run cut off at its limit
#   would be, to see the report it leaves.
# Needs root (unshare, mount) and .gpu-bundle (scripts/gpu-bundle.sh). Builds in build-gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${1:?usage: scripts/gpu-rehearsal.sh OUT_DIR [KILL_AFTER_S]}
kill_after=${2:-}
venv=${GPU_REHEARSAL_VENV:-/opt/torch/.venv}
fail() { echo "gpu-rehearsal: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (a private mount namespace and an overlay over /usr)"
[ -d .gpu-bundle ] || fail "no .gpu-bundle here: run scripts/gpu-bundle.sh first"
if ! "$venv/bin/python3" -c "import torch, cmake, ninja" 2> /dev/null; then
  echo "gpu-rehearsal: making $venv (torch 2.11.0, numpy, cmake, ninja from PyPI)"
  python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check torch==2.11.0 numpy cmake ninja ||
    fail "pip install into $venv failed"
fi

# The overlay's upper layer: a whiteout (character device 0/0) for every path to hide.
layer=$(mktemp -d /tmp/gpu-rehearsal.XXXXXX)
trap 'rm -rf "$layer"' EXIT
mkdir -p "$layer/upper" "$layer/work" "$layer/empty"
hidden=0
hide() {  # hide /usr/PATH...
  local path
  for path in "$@"; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    mkdir -p "$layer/upper$(dirname "${path#/usr}")"
    mknod "$layer/upper${path#/usr}" c 0 0
    hidden=$((hidden + 1))
  done
}
while read -r file; do
  hide "/usr/${file#*/usr/}"
done < <(find .gpu-bundle -path '*/usr/*' \( -type f -o -type l \))
hide /usr/bin/cmake /usr/bin/ctest /usr/bin/cpack /usr/bin/ninja /usr/bin/gnuplot
[ -e /usr/local/cuda ] && hide "$(readlink -f /usr/local/cuda)/include/nccl.h"
hide /usr/local/include/nccl.h /usr/include/nccl.h
project_venv=$(scripts/venv.sh)
echo "gpu-rehearsal: $hidden files hidden from /usr; $project_venv hidden; python $venv/bin/python3"

inside=$(cat << 'EOF'
set -e
mount -t overlay overlay -o "lowerdir=/usr,upperdir=$layer/upper,workdir=$layer/work" /usr
[ -d "$project_venv" ] && mount --bind "$layer/empty" "$project_venv"
export PATH="$venv/bin:$PATH"
for gone in /usr/include/spdlog/spdlog.h /usr/include/cxxopts.hpp /usr/bin/cmake; do
  [ ! -e "$gone" ] || { echo "gpu-rehearsal: $gone still visible" >&2; exit 1; }
done
echo "gpu-rehearsal: cmake is $(command -v cmake), ninja $(command -v ninja)"
GPU_CHECK_DEVICE=cpu GPU_CHECK_CONFIG=configs/tiny-m32.json GPU_CHECK_DEADLINE=${GPU_CHECK_DEADLINE:-5400} \
  GPU_CHECK_CAP_SCALE=${GPU_CHECK_CAP_SCALE:-10} scripts/gpu-check.sh "$out" "$venv/bin/python3"
EOF
)
export layer project_venv venv out
mkdir -p "$out" && out=$(cd "$out" && pwd)
# A PID namespace: killing its first process ends every process of the check, as the device
# tool's limit does on the GPU machine.
command=(unshare --mount --propagation private --pid --fork --kill-child bash -c "$inside")
if [ -n "$kill_after" ]; then
  status=0
  timeout -s KILL "$kill_after" "${command[@]}" || status=$?
  echo "gpu-rehearsal: killed after $kill_after s (exit $status)"
else
  "${command[@]}"
fi
echo "gpu-rehearsal: $out holds $(ls -A "$out" | wc -l) files: $(ls -A "$out" | tr '\n' ' ')"
