#!/usr/bin/env bash
# train checks the config and the layout of its world before any rendezvous and names every
# problem at once, one line each: here an expert-parallel size that divides neither the experts
# nor the data-parallel ranks, and a pipeline that does not divide the world.
# usage: train_impossible_layout.sh BUILD/yuanmoe   (run from the repository root)
set -u
bin=$1
err=$(mktemp)
trap 'rm -f "$err"' EXIT
RANK=0 WORLD_SIZE=4 LOCAL_RANK=0 "$bin" train --config configs/tiny-m32.json --run-dir "$(mktemp -d)" \
  --set parallel.expert=3 --set parallel.pipeline_parallel_size=3 2>"$err" >/dev/null
code=$?
fail() { echo "FAIL: $*"; echo "--- exit $code; stderr:"; cat "$err"; exit 1; }
[ "$code" -ne 0 ] && [ "$code" -lt 128 ] || fail "expected a non-zero exit without a crash"
[ "$(wc -l <"$err")" -eq 2 ] || fail "expected two lines, one per problem"
grep -q "parallel.expert: is 3, which does not divide moe.num_experts (32)" "$err" || fail "the experts rule is not named"
grep -q "parallel.pipeline_parallel_size: is 3, which does not divide the world size (4)" "$err" \
  || fail "the world-size rule is not named"
echo "ok: both problems named, one line each"
