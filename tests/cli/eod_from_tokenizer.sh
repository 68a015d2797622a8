#!/usr/bin/env bash
# Data made by other tools has no .meta.json (Megatron's preprocess_data.py writes only .bin/.idx).
# With data.tokenizer set and data.eod_id left at -1, training takes the EOD id from the tokenizer,
# as docs/data.md says, and logs which; without a tokenizer it stops with one line naming the key.
# usage: eod_from_tokenizer.sh BUILD/yuanmoe
set -euo pipefail
bin=$1
source "$(dirname "$0")/small_run.sh"
make_small_run "$bin" yuanmoe-eod
rm data_train.meta.json data_valid.meta.json
"$bin" train --config run.json --run-dir run --set train.max_steps=2 > train.out 2>&1 \
  || { echo "FAIL: training on data without .meta.json"; cat train.out; exit 1; }
grep -q "data.eod_id -1: data_train has no .meta.json; using <eod> = 4 of data.model" train.out \
  || { echo "FAIL: the EOD id's source is not logged"; cat train.out; exit 1; }
if "$bin" train --config run.json --run-dir run2 --set data.tokenizer= > no_tokenizer.out 2>&1; then
  echo "FAIL: no .meta.json and no tokenizer, yet training started"; exit 1
fi
grep -q "data.eod_id: unknown: set it or data.tokenizer" no_tokenizer.out \
  || { echo "FAIL: the error does not name data.eod_id"; cat no_tokenizer.out; exit 1; }
echo "ok: the EOD id came from data.model's <eod>; without a tokenizer the run stops naming data.eod_id"
