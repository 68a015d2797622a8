#!/usr/bin/env bash
# Installs what is missing, configures, builds and runs the whole test suite through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DYUANMOE_BUILD_TESTS=ON
cmake --build build -j "$jobs"
# Each test uses one intra-op thread so that ctest -j runs them side by side without oversubscription.
OMP_NUM_THREADS=1 ctest --test-dir build --output-on-failure -j "$jobs"
