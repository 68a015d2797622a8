#!/usr/bin/env bash
# Installs what yuanmoe needs on a Debian machine (SPEC §1), and only what is missing.
# Idempotent: a second run installs nothing and says so.
set -euo pipefail

# Build and run-time dependencies (Debian package names).
packages=(
  cmake g++ ninja-build pkg-config
  libtorch-dev libgloo-dev libopenblas0-openmp
  libsentencepiece-dev sentencepiece
  libcxxopts-dev libspdlog-dev nlohmann-json3-dev libgtest-dev
  python3-numpy python3-torch   # independent readers and the PyTorch reference model (tests/)
  gnuplot-nox   # plots/ during training (optional at run time: skipped with a warning)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present, nothing to install"
else
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: installed ${#missing[@]} packages"
fi

# Debian's libtorch links libblas.so.3; without an optimised BLAS it resolves to the reference
# (netlib) BLAS, ~20x slower (reference/distributed.md §6). OpenBLAS-OpenMP has the higher priority.
blas=$(readlink -f /etc/alternatives/libblas.so.3-x86_64-linux-gnu 2>/dev/null || true)
echo "setup: libblas.so.3 -> ${blas:-unknown}"
