#!/usr/bin/env bash
# What the demo and the ablation need before they train: install what is missing, build
# build/yuanmoe, fetch the Brown corpus, and train the tokenizer and write the datasets if absent
# (data/brown.model, data/brown_{train,valid}.{bin,idx}).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build --target yuanmoe -j "$(nproc)"

[ -f data/brown.txt ] || ./scripts/get-corpus.sh
if [ ! -f data/brown_train.idx ] || [ ! -f data/brown.model ]; then
  build/yuanmoe prepare-data --input data/brown.txt --output data/brown --train-tokenizer 8192
fi
