#!/usr/bin/env bash
# expect.sh BINARY ok|error REGEX [ARGS...]
#   ok:    exit 0 and stdout matches REGEX (extended grep).
#   error: non-zero exit below 128 (no crash), exactly one line on stderr, matching REGEX.
set -u
binary=$1 mode=$2 regex=$3
shift 3
out=$(mktemp) err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
"$binary" "$@" >"$out" 2>"$err" </dev/null
code=$?
fail() { echo "FAIL: $*"; echo "--- exit $code; stdout:"; cat "$out"; echo "--- stderr:"; cat "$err"; exit 1; }
case "$mode" in
  ok)
    [ "$code" -eq 0 ] || fail "expected exit 0"
    grep -Eq -- "$regex" "$out" || fail "stdout does not match /$regex/"
    ;;
  error)
    [ "$code" -ne 0 ] || fail "expected a non-zero exit"
    [ "$code" -lt 128 ] || fail "killed by a signal (crash)"
    [ "$(wc -l <"$err")" -eq 1 ] || fail "expected exactly one line on stderr"
    grep -Eq -- "$regex" "$err" || fail "stderr does not match /$regex/"
    ;;
  *) echo "usage: expect.sh BINARY ok|error REGEX [ARGS...]"; exit 2 ;;
esac
echo "ok: $mode /$regex/"
