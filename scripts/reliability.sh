#!/usr/bin/env bash
# Reproduces the figures of docs/reliability.md in one run: the fault-injection suite (random
# kill -9 of a training run, a full disk during a checkpoint write, a dead rank, non-finite steps),
# every bad-input test, and a bounded libFuzzer run of each parser. Exits non-zero if anything was
# lost, diverged or crashed.
# usage: scripts/reliability.sh [FUZZ_SECONDS]   (per fuzz target; default 60, 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz_seconds=${1:-60}
./scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DYUANMOE_BUILD_TESTS=ON > /dev/null
cmake --build build -j "$(nproc)"

# The fault tests, and every test whose subject is a bad file, value or argument.
faults='cli\.kill_resume|cli\.disk_full|python\.parallel|TrainerTest\.(Nonfinite|Skipped|TooMany)'
inputs='cli\.|python\.hf_interop|fuzz_replay\.|CorruptCheckpointTest\.|IndexedDataset\.|ConfigTest\.'
inputs+='|TrainerTest\.TokensBeyond|Tokenizer\.BadModels|Prepare\.JsonlErrors'
log=build/reliability.log
set +e
OMP_NUM_THREADS=1 ctest --test-dir build -j "$(nproc)" -V -R "^($faults|$inputs)" > "$log" 2>&1
ctest_rc=$?
set -e

# Test names that passed (ctest's summary lines), and the lines the fault scripts print.
passed() { grep -E '^ *[0-9]+/[0-9]+ Test +#[0-9]+: ' "$log" | grep -E ' Passed ' | awk '{print $4}' | grep -cE "$1" || true; }
said() { grep -E "$1" "$log" | head -1 | sed -E 's/^[0-9]+: //'; }
total=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#' "$log" || true)
corpus_files=$(find fuzz/corpus -type f | wc -l)

echo
echo "== faults"
echo "random kill -9 of a run:  $(said 'OK: [0-9]+ kills')"
echo "full disk (ulimit -f):    $(said 'OK: write failure')"
echo "dead rank:                $(said 'kill -9 rank 1:')"
echo "                          $(said 'the killed run stopped')"
echo "                          $(said 're-run resumes')"
echo "non-finite steps:         $(passed '^TrainerTest\.(Nonfinite|Skipped|TooMany)') of 3 trainer tests pass"
echo
echo "== bad inputs"
echo "command-line cases:       $(passed '^cli\.') cli.* tests pass ($(passed '^cli\.(kill_resume|disk_full)') of them the fault scripts)"
echo "config tests:             $(passed '^ConfigTest\.') ConfigTest.* pass"
echo "dataset tests:            $(passed '^IndexedDataset\.') IndexedDataset.* pass, plus out-of-vocabulary ids: $(passed '^TrainerTest\.TokensBeyond')"
echo "checkpoint tests:         $(passed '^CorruptCheckpointTest\.') CorruptCheckpointTest.* pass"
echo "HF weights:               $(grep -cE '^[0-9]+: ok +malformed' "$log" || true) malformed inputs refused (python.hf_interop)"
echo "fuzz corpora replayed:    $(passed '^fuzz_replay\.') targets, $corpus_files inputs"
echo
echo "ctest: $(passed '.') of $total selected tests passed (log: $log)"

fuzz_rc=0
if [ "$fuzz_seconds" -gt 0 ]; then
  echo
  echo "== fuzzing, $fuzz_seconds s per target"
  ./scripts/fuzz.sh "$fuzz_seconds" || fuzz_rc=$?
fi
[ "$ctest_rc" -eq 0 ] && [ "$fuzz_rc" -eq 0 ]
