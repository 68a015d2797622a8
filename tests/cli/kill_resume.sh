#!/usr/bin/env bash
# Kill -9 a training run at random moments (inside steps, evaluations and checkpoint writes),
# rerun the same command each time, and require the final weights, optimizer state and every
# logged loss to equal those of an uninterrupted run, byte for byte.
# usage: kill_resume.sh BINARY
set -euo pipefail
bin=$(realpath "$1")
source "$(dirname "$(realpath "$0")")/small_run.sh"
make_small_run "$bin" yuanmoe-kill   # a fresh temp dir with corpus, dataset and run.json; we are in it

"$bin" train --config run.json --run-dir straight > straight.log 2>&1

kills=0 during_write=0
RANDOM=11
for attempt in $(seq 1 30); do
  "$bin" train --config run.json --run-dir killed > "killed.$attempt.log" 2>&1 &
  pid=$!
  # Every other attempt first waits for a checkpoint to exist, so some kills always land after
  # one (start-up is slower on a loaded machine, e.g. under ctest -j2); then kill anywhere from
  # before the first step to late in the run.
  if [ $((attempt % 2)) -eq 0 ]; then
    for _ in $(seq 1 200); do
      [ -e killed/checkpoints/latest ] || ! kill -0 "$pid" 2>/dev/null && break
      sleep 0.1
    done
  fi
  sleep "0.$((RANDOM % 9 + 1))$((RANDOM % 10))"
  if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; break; fi
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  kills=$((kills + 1))
  if compgen -G "killed/checkpoints/.tmp-*" > /dev/null; then during_write=$((during_write + 1)); fi
done
"$bin" train --config run.json --run-dir killed > killed.final.log 2>&1

final=checkpoints/step_00000060
for f in model-stage-00.safetensors optimizer-stage-00.safetensors rng-rank-0.safetensors; do
  cmp "straight/$final/$f" "killed/$final/$f" || { echo "FAIL: $f differs after $kills kills"; exit 1; }
done
losses() { grep -v '"split"' "$1/metrics.jsonl" | sed -E 's/.*"step":([0-9]+),"loss":([^,]+),.*/\1 \2/'; }
diff <(losses straight) <(losses killed) > /dev/null || { echo "FAIL: logged losses differ"; diff <(losses straight) <(losses killed) | head; exit 1; }
[ "$(losses straight | wc -l)" -eq 60 ] || { echo "FAIL: expected 60 train lines"; exit 1; }
resumes=$(cat killed.*.log | grep -c "resumed from" || true)
[ "$resumes" -gt 0 ] || { echo "FAIL: no run resumed from a checkpoint"; exit 1; }
echo "OK: $kills kills, $resumes resumes ($during_write left a partial checkpoint), final weights, optimizer state and 60 losses identical"
