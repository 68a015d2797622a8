#!/usr/bin/env bash
# Installs what yuanmoe needs on a Debian machine, and only what is missing:
#   1. Debian packages: compiler and build tools, header-only libraries, SentencePiece, GoogleTest,
#      gnuplot, the default corpus (bible-kjv);
#   2. a Python virtual environment (scripts/venv.sh says where) holding PyTorch 2.11.0 from PyPI:
#      its libtorch, built for CUDA 13.0, is the one library the C++ code builds against, and its
#      torch runs the independent references and the Python tests; and tensorboard, whose own
#      event reader checks the event files `train` writes (tests/python/test_tensorboard.py).
# Idempotent: a second run installs nothing and says so. A failed install names what failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

TORCH_VERSION=2.11.0
python_packages=("torch==$TORCH_VERSION" "numpy" "tensorboard")

# Debian package names. libgloo-dev only for its headers: the wheel's ProcessGroupGloo.hpp
# includes gloo/ headers the wheel does not ship (Gloo itself is compiled into libtorch_cpu).
packages=(
  cmake g++ ninja-build pkg-config python3-venv
  libgloo-dev libfmt-dev libspdlog-dev libcxxopts-dev nlohmann-json3-dev libgtest-dev
  libsentencepiece-dev sentencepiece
  gnuplot-nox   # plots/ during training (optional at run time: skipped with a warning)
  bible-kjv     # the default corpus (scripts/get-corpus.sh)
)

fail() { echo "setup: $*" >&2; exit 1; }

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} Debian packages present, nothing to install"
else
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq || fail "apt-get update failed (is a Debian mirror reachable?)"
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install failed for: ${missing[*]}"
  echo "setup: installed ${#missing[@]} Debian packages"
fi

# The environment is complete when its torch is exactly $TORCH_VERSION and numpy and
# TensorBoard's event reader import.
venv_ready() {
  [ -x "$YUANMOE_PYTHON" ] && "$YUANMOE_PYTHON" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys, numpy, torch
from tensorboard.backend.event_processing import event_accumulator
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
PY
}

if venv_ready; then
  echo "setup: $YUANMOE_VENV has torch $("$YUANMOE_PYTHON" -c 'import torch; print(torch.__version__)'), nothing to install"
else
  if [ ! -x "$YUANMOE_PYTHON" ]; then
    echo "setup: creating the Python environment $YUANMOE_VENV"
    mkdir -p "$(dirname "$YUANMOE_VENV")"
    python3 -m venv "$YUANMOE_VENV" || fail "python3 -m venv $YUANMOE_VENV failed"
  fi
  echo "setup: installing ${python_packages[*]} into $YUANMOE_VENV from PyPI (about 3 GB with its CUDA libraries)"
  "$YUANMOE_PYTHON" -m pip install --quiet --disable-pip-version-check "${python_packages[@]}" \
    || fail "pip install ${python_packages[*]} failed (is PyPI reachable?)"
  venv_ready || fail "$YUANMOE_VENV: torch $TORCH_VERSION, numpy or tensorboard do not import after installing them"
  echo "setup: installed torch $("$YUANMOE_PYTHON" -c 'import torch; print(torch.__version__)') into $YUANMOE_VENV"
fi
