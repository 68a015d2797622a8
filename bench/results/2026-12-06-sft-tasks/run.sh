#!/usr/bin/env bash
# What a few dozen fine-tuning steps teach the demo's model, task by task (README.md here).
# Each task: tasks.py writes the pairs, prepare-data encodes them with the demo's tokenizer, train
# fine-tunes runs/tiny-m32 on them alone (configs/tiny-m32-sft-16k.json's recipe, 8 windows of
# 2,048 tokens a step instead of one of 16,384: the same tokens a step, a quarter of the time),
# generate answers the held-out prompts greedily. Needs ./scripts/demo.sh first. About 5 min a task.
# usage: run.sh OUT_DIR [TASK...]   (default: every task; TASK=book_reference:5e-3:48 sets lr, steps)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../.."
source scripts/venv.sh
out=$(realpath -m "$1"); shift
tasks=("$@"); [ ${#tasks[@]} -gt 0 ] || tasks=(book book_reference book_reference:5e-3:48 reference last_word testament finish)
mkdir -p "$out"
for spec in "${tasks[@]}"; do
  IFS=: read -r task lr steps <<<"$spec"
  lr=${lr:-2e-3}; steps=${steps:-24}
  dir="$out/$task-$lr-$steps"
  mkdir -p "$dir"
  bible -f "Gen1:1-Rev22:21" | "$YUANMOE_PYTHON" "$here/tasks.py" "$task" "$dir"
  for split in train heldout; do
    build/yuanmoe prepare-data --format sft-text --tokenizer data/corpus.model --input "$dir/$split.txt" \
      --output "$dir/$split" --valid-fraction 0 >/dev/null
  done
  "$YUANMOE_PYTHON" - "$dir" "$lr" "$steps" <<'PY'
import json, sys
d, lr, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
c = json.load(open("configs/tiny-m32-sft-16k.json"))
c["train"].update(seq_length=2048, global_batch_size=8, recompute=False, lr=lr, min_lr=lr, max_steps=steps,
                  eval_interval=12, eval_steps=4)
c["checkpoint"].update(interval=24, keep_last=2)
c["data"]["blend"] = [{"prefix": f"{d}/train_train", "valid_prefix": f"{d}/heldout_train", "weight": 1.0,
                       "name": "pairs", "loss_mask": "sft"}]
json.dump(c, open(f"{d}/config.json", "w"), indent=1)
PY
  build/yuanmoe train --config "$dir/config.json" --run-dir "$dir/run" >"$dir/train.log" 2>&1
  for checkpoint in runs/tiny-m32 "$dir/run"/checkpoints/step_*; do
    name=$(basename "$checkpoint")
    build/yuanmoe generate --checkpoint "$checkpoint" --prompts "$dir/test_prompts.txt" --temperature 0 \
      --max-new-tokens 8 >"$dir/answers_$name.jsonl" 2>/dev/null
    "$YUANMOE_PYTHON" - "$dir" "$name" "$spec" <<'PY'
import collections, json, sys
d, name, spec = sys.argv[1:]
answers = [json.loads(l)["answer"] for l in open(f"{d}/test.jsonl")]
got = [json.loads(l)["completion"].strip() for l in open(f"{d}/answers_{name}.jsonl")]
right = sum(a == g for a, g in zip(answers, got))
top, count = collections.Counter(answers).most_common(1)[0]
print(f"{spec:24s} {name:16s} exact match {right}/{len(answers)}  (always '{top}': {count})  "
      f"most given: {collections.Counter(got).most_common(2)}")
PY
  done
done
