#!/usr/bin/env bash
# The whole test suite under AddressSanitizer + UndefinedBehaviorSanitizer: builds build-asan/
# with -DYUANMOE_SANITIZE=ON (our code instrumented, libtorch as shipped) and runs ctest there.
# Extra arguments go to ctest, e.g. scripts/sanitize.sh -L unit.
# usage: scripts/sanitize.sh [CTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DYUANMOE_BUILD_TESTS=ON -DYUANMOE_SANITIZE=ON > /dev/null
cmake --build build-asan -j "$(nproc)"
# libtorch's start-up allocations outlive main: leak reports would only be about them. UBSan
# findings abort (-fno-sanitize-recover), so a finding fails its test.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 OMP_NUM_THREADS=1
ctest --test-dir build-asan -j "$(nproc)" --output-on-failure --timeout 1800 "$@"
