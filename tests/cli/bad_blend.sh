#!/usr/bin/env bash
# A bad data.blend stops `train` (and `inspect`) with one line on stderr naming data.blend and
# the entry, and a non-zero exit without a crash (docs/data.md, "Blends").
# usage: bad_blend.sh BUILD/yuanmoe   (run from the repository root)
set -u
bin=$1
err=$(mktemp)
run_dir=$(mktemp -d)
trap 'rm -rf "$err" "$run_dir"' EXIT
failures=0
# expect COMMAND EXPECTED-TEXT SET-ARGS...: one line on stderr containing EXPECTED-TEXT (fixed string).
expect() {
  local command=$1 expected=$2
  shift 2
  local args=(--config configs/tiny-m32.json --set data.train_prefix= "$@")
  [ "$command" = train ] && args+=(--run-dir "$run_dir")
  "$bin" "$command" "${args[@]}" 2>"$err" >/dev/null
  local code=$?
  if [ "$code" -eq 0 ] || [ "$code" -ge 128 ] || [ "$(wc -l <"$err")" -ne 1 ] || ! grep -qF -- "$expected" "$err"; then
    echo "FAIL: $command $* -> exit $code, expected one line with: $expected"; cat "$err"
    failures=$((failures + 1))
  else
    echo "ok: $expected"
  fi
}
expect inspect 'data.blend: is empty' --set 'data.blend=[]'
expect inspect "data.blend: Megatron's flat form [weight, prefix, weight, prefix, ...] needs an even number of items, got 3" \
  --set 'data.blend=[0.7,"data/web",0.3]'
expect inspect 'data.blend[1]: weight must be > 0, got 0 (prefix "data/code")' --set 'data.blend=[0.7,"data/web",0,"data/code"]'
expect inspect 'data.blend[0].weight: required key is missing' --set 'data.blend=[{"prefix":"data/web"}]'
expect train 'data.blend: and data.train_prefix are both set' \
  --set data.train_prefix=data/corpus_train --set 'data.blend=[1,"data/web"]'
expect train 'data.blend[0]: prefix: tests/cli/no_such_prefix.idx: cannot open' \
  --set 'data.blend=[0.7,"tests/cli/no_such_prefix",0.3,"data/code"]'
[ "$failures" -eq 0 ] || exit 1
