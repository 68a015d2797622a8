#!/usr/bin/env bash
# The router ablation (docs/ablation.md) from scratch: install what is missing, build, fetch the
# corpus and prepare it like the demo, then run the three studies with scripts/ablate.py, which
# writes ablation/results.{csv,md} and the plots. Finished runs are kept: rerunning resumes.
# About two hours on 2 cores. Extra arguments go to ablate.py, e.g. --jobs 1, or other study files.
# usage: scripts/ablate.sh [ABLATE.PY ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/prepare-corpus.sh   # setup, build, corpus, tokenizer and datasets

# Without a study of their own (a .json file, or --name), the arguments apply to the three shipped ones.
studies=(configs/ablation/study-routers.json configs/ablation/study-experts.json configs/ablation/study-balance.json)
for arg in "$@"; do
  case "$arg" in *.json | --name) studies=() ;; esac
done
set -- "$@" "${studies[@]}"
source scripts/venv.sh
exec "$YUANMOE_PYTHON" scripts/ablate.py "$@"
