#!/usr/bin/env bash
# README's first command: install what is missing, build, fetch the corpus (the King James Bible), train the
# tokenizer and dataset if absent, pretrain configs/tiny-m32.json on CPU, evaluate the final
# checkpoint and generate a sample. Rerunning it resumes (or, once done, just evaluates again).
# Extra arguments go to `yuanmoe train`, e.g. ./scripts/demo.sh --set train.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/prepare-corpus.sh   # setup, build, corpus, tokenizer and datasets

run=runs/tiny-m32
build/yuanmoe train --config configs/tiny-m32.json --run-dir "$run" "$@"
echo
build/yuanmoe eval --checkpoint "$run"
echo
echo "sample (continuation of \"And the LORD said\", temperature 0.8, top-k 40):"
build/yuanmoe generate --checkpoint "$run" --prompt "And the LORD said" --max-new-tokens 48
echo
echo "checkpoints: $run/checkpoints   metrics: $run/metrics.jsonl   plots: $run/plots/{loss,expert_load}.png"
echo "next: fine-tune to 4x the context with build/yuanmoe train --config configs/tiny-m32-1k-finetune.json"
