#!/usr/bin/env bash
# prepare-data on instruction data (docs/data.md, "Instruction data (SFT)") through the real binary:
# tests/data/sft.txt trains a tokenizer with <sep> and <n> and becomes an SFT dataset (400 pieces:
# its 56 characters do not fit in 300 beside the 263 reserved ones); each bad line of
# tests/data/sft_bad.txt gets one warning naming its file and line, the good ones are kept, and a
# summary counts them; a file of bad lines only, and a tokenizer without <sep>, stop with one line.
# usage: sft_prepare.sh BUILD/yuanmoe   (run from the repository root)
set -euo pipefail
bin=$1
root=$(pwd)
expect="$root/tests/cli/expect.sh"
work=$(mktemp -d /tmp/yuanmoe-sft-XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $1"; [ -f "${2:-}" ] && cat "$2"; exit 1; }

"$bin" prepare-data --input tests/data/sft.txt --format sft-text --output "$work/sft" \
  --train-tokenizer 400 --valid-fraction 0 --workers 1 > "$work/good.out" 2>&1 \
  || fail "prepare-data on tests/data/sft.txt" "$work/good.out"
grep -q '"sft": true' "$work/sft_train.meta.json" || fail "meta has no \"sft\": true" "$work/sft_train.meta.json"
grep -q '"sep_id": 5' "$work/sft_train.meta.json" || fail "meta has no sep_id 5" "$work/sft_train.meta.json"
grep -q '"newline_id": 6' "$work/sft_train.meta.json" || fail "meta has no newline_id 6" "$work/sft_train.meta.json"
grep -q '"documents": 16' "$work/sft_train.meta.json" || fail "not one document per sample" "$work/sft_train.meta.json"

"$bin" prepare-data --input tests/data/sft_bad.txt --format sft-text --output "$work/bad" \
  --tokenizer "$work/sft.model" --valid-fraction 0 > "$work/bad.out" 2>&1 \
  || fail "prepare-data on tests/data/sft_bad.txt" "$work/bad.out"
for line in "tests/data/sft_bad.txt:2: no <sep> between instruction and response; sample left out" \
            "tests/data/sft_bad.txt:4: empty response; sample left out" \
            "tests/data/sft_bad.txt:6: more than one <sep>; sample left out" \
            "prepare-data: sft: 3 of 6 samples left out"; do
  grep -qF -- "$line" "$work/bad.out" || fail "no line '$line'" "$work/bad.out"
done
[ "$(grep -c 'sample left out' "$work/bad.out")" -eq 3 ] || fail "not one warning per bad line" "$work/bad.out"
grep -q '"documents": 3' "$work/bad_train.meta.json" || fail "the 3 good samples are not kept" "$work/bad_train.meta.json"

printf 'no separator\n\nempty response<sep>\n' > "$work/all_bad.txt"
"$expect" "$bin" error "all_bad.txt: none of the 2 samples is usable" prepare-data --input "$work/all_bad.txt" \
  --format sft-text --output "$work/all_bad" --tokenizer "$work/sft.model"

# A tokenizer without <sep>: the piece renamed in place (same length, so the model file stays valid).
perl -pe 's/<sep>/<xep>/g' "$work/sft.model" > "$work/nosep.model"
"$expect" "$bin" error "nosep.model: tokenizer has no \"<sep>\" piece, which --format sft-jsonl" prepare-data \
  --input tests/data/sft.txt --format sft-jsonl --output "$work/nosep" --tokenizer "$work/nosep.model"
echo "ok: SFT samples, a warning per bad line with the summary, all-bad and no-<sep> errors"
