#!/usr/bin/env bash
# A checkpoint write that runs out of space (a file-size limit, ulimit -f, so the test needs no
# root): the run must stop with one line naming the file, the previous checkpoint must stay the
# newest and intact, and rerunning without the limit must resume and end with the weights and
# losses of a run that never failed.
# usage: disk_full.sh BINARY
set -euo pipefail
bin=$(realpath "$1")
source "$(dirname "$(realpath "$0")")/small_run.sh"
make_small_run "$bin" yuanmoe-diskfull   # a fresh temp dir with corpus, dataset and run.json; we are in it
fail() { echo "FAIL: $*"; exit 1; }

"$bin" train --config run.json --run-dir straight --set train.max_steps=20 > straight.log 2>&1
"$bin" train --config run.json --run-dir full --set train.max_steps=20 --exit-after-steps 5 > first.log 2>&1
size_kb=$(( $(stat -c %s full/checkpoints/step_00000005/optimizer-stage-00.safetensors) / 1024 ))
# The optimizer file of the next checkpoint (step 10) outgrows the limit; logs and metrics stay
# well below it.
set +e
( ulimit -f $((size_kb / 2)); exec "$bin" train --config run.json --run-dir full --set train.max_steps=20 ) \
  > limited.out 2> limited.err
rc=$?
set -e
[ "$rc" -ne 0 ] || fail "the limited run exited 0"
grep -q "step_00000010.*optimizer-stage-00.safetensors: write failed: File too large" limited.err ||
  fail "no clear error line: $(cat limited.err)"
[ "$(grep -c 'error' limited.err)" -eq 1 ] || fail "expected one error line: $(cat limited.err)"
[ "$(cat full/checkpoints/latest)" = "step_00000005" ] || fail "latest moved to $(cat full/checkpoints/latest)"
[ ! -e full/checkpoints/step_00000010 ] || fail "a torn step_00000010 is visible"

"$bin" train --config run.json --run-dir full --set train.max_steps=20 > resumed.log 2>&1
grep -q "resumed from" resumed.log || fail "the rerun did not resume"
final=checkpoints/step_00000020
for f in model-stage-00.safetensors optimizer-stage-00.safetensors rng-rank-0.safetensors; do
  cmp -s "straight/$final/$f" "full/$final/$f" || fail "$f differs from the run that never failed"
done
losses() { grep -v '"split"' "$1/metrics.jsonl" | sed -E 's/.*"step":([0-9]+),"loss":([^,]+),.*/\1 \2/'; }
diff <(losses straight) <(losses full) > /dev/null || fail "logged losses differ"

# A non-finite step from the command line (fault injection): `stop` ends the run naming the step
# and leaves the last checkpoint newest; the rerun without the fault ends like the straight run.
set +e
"$bin" train --config run.json --run-dir nan --set train.max_steps=20 --debug-nonfinite-steps 13 \
  > nan.out 2> nan.err
rc=$?
set -e
[ "$rc" -ne 0 ] && grep -q "step 13: loss .* not finite; nothing of this step was applied" nan.err ||
  fail "non-finite step not reported: $(cat nan.err)"
[ "$(cat nan/checkpoints/latest)" = "step_00000010" ] || fail "latest after the non-finite stop: $(cat nan/checkpoints/latest)"
"$bin" train --config run.json --run-dir nan --set train.max_steps=20 > nan.resumed.log 2>&1
cmp -s "straight/$final/model-stage-00.safetensors" "nan/$final/model-stage-00.safetensors" || fail "weights differ after the non-finite stop"
echo "OK: write failure at step 10 named the file, step 5 stayed newest, resume reproduced the run; non-finite stop at step 13 likewise"
