#!/usr/bin/env bash
# The data of scripts/sft-demo.sh, from the King James Bible and with the demo's tokenizer
# (data/corpus.model, trained by prepare-data with the <sep> and <n> pieces): scripts/sft_data.py
# says what the instruction task is and why, and writes the text; prepare-data turns it into
#   data/sft/books_{train,valid}   instruction pairs (--format sft-text), valid = held-out verses
#   data/sft/books_test.jsonl      held-out prompts and answers for exact match
#   data/sft/long_{train,valid}    whole books as documents (the long-context source)
# Idempotent: does nothing when data/sft holds all of them (delete data/sft to make them again).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

out=data/sft
if [ -f "$out/books_valid.idx" ] && [ -f "$out/long_valid.idx" ] && [ -f "$out/books_test.jsonl" ]; then
  echo "make-sft-data: $out already holds the instruction pairs and the long documents, nothing to do"
  exit 0
fi
[ -f data/corpus.model ] || { echo "make-sft-data: data/corpus.model not found: run ./scripts/demo.sh first" >&2; exit 1; }
[ -x build/yuanmoe ] || { echo "make-sft-data: build/yuanmoe not found: run ./scripts/demo.sh first" >&2; exit 1; }
command -v bible >/dev/null || { echo "make-sft-data: 'bible' not found (Debian: apt-get install bible-kjv, or ./scripts/setup.sh)" >&2; exit 1; }

mkdir -p "$out"
bible -f "Gen1:1-Rev22:21" | "$YUANMOE_PYTHON" scripts/sft_data.py "$out"
prepare() { build/yuanmoe prepare-data --tokenizer data/corpus.model --log-interval 60 "$@"; }
prepare --format sft-text --input "$out/books.txt" --output "$out/books" --valid-fraction 0
# The held-out pairs are a split of their own: prepared alone, then named as the valid split.
prepare --format sft-text --input "$out/books_heldout.txt" --output "$out/books_heldout" --valid-fraction 0
for ext in bin idx meta.json; do mv "$out/books_heldout_train.$ext" "$out/books_valid.$ext"; done
sed -i 's/"split": "train"/"split": "valid"/' "$out/books_valid.meta.json"
# 31 documents: 2 of them (every fifteenth) for validation.
prepare --format text --input "$out/long.txt" --output "$out/long" --valid-fraction 0.07
