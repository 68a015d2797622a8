#!/usr/bin/env bash
# Fuzzes the parsers that read other people's files: builds the libFuzzer targets of fuzz/ with
# clang, AddressSanitizer and UndefinedBehaviorSanitizer in build-fuzz/, runs each for SECONDS
# (default 60) from its seed corpus (fuzz/corpus/<target>/), and prints executions per target.
# A crash is copied into fuzz/corpus/<target>/ (ctest's fuzz_replay.<target> then replays it on
# every build) and the script exits 1.
# usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
targets="config indexed_dataset safetensors manifest"

cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DYUANMOE_FUZZ=ON -DYUANMOE_BUILD_TESTS=OFF > /dev/null
cmake --build build-fuzz -j "$(nproc)" $(for t in $targets; do printf -- '--target fuzz_%s ' "$t"; done)

# libtorch's start-up allocations outlive main: leak reports would only be about them.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
failed=0
printf '%-16s %12s %10s %s\n' target executions "exec/s" result
for t in $targets; do
  work=build-fuzz/run-$t
  rm -rf "$work" && mkdir -p "$work/corpus" && cp fuzz/corpus/$t/* "$work/corpus/"
  set +e
  build-fuzz/fuzz_$t "$work/corpus" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix="$work/" > "$work/log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/log")
  result=ok
  if [ "$rc" -ne 0 ]; then
    failed=1
    result="CRASH (see $work/log)"
    for crash in "$work"/crash-* "$work"/timeout-* "$work"/oom-*; do
      [ -e "$crash" ] && cp "$crash" "fuzz/corpus/$t/" && result="$result, kept fuzz/corpus/$t/$(basename "$crash")"
    done
  fi
  printf '%-16s %12s %10s %s\n' "$t" "${runs:-?}" "${rate:-?}" "$result"
done
exit $failed
