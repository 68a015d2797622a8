#!/usr/bin/env bash
# The router ablation (docs/ablation.md) from scratch: install what is missing, build, fetch the
# Brown corpus and prepare it like the demo, then run both studies with scripts/ablate.py, which
# writes ablation/results.{csv,md} and the plots. Finished runs are kept: rerunning resumes.
# About an hour on 2 cores. Extra arguments go to ablate.py, e.g. --jobs 1, or other study files.
# usage: scripts/ablate.sh [ABLATE.PY ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build --target yuanmoe -j "$(nproc)"

[ -f data/brown.txt ] || ./scripts/get-corpus.sh
if [ ! -f data/brown_train.idx ] || [ ! -f data/brown.model ]; then
  build/yuanmoe prepare-data --input data/brown.txt --output data/brown --train-tokenizer 8192
fi

if [ $# -eq 0 ]; then
  set -- configs/ablation/study-routers.json configs/ablation/study-experts.json
fi
exec /usr/bin/python3 scripts/ablate.py "$@"
