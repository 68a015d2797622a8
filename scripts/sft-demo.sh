#!/usr/bin/env bash
# Fine-tunes the demo's checkpoint to 16K context the way Yuan 2.0-M32 was (docs/training.md,
# "Fine-tuning to 16K"): configs/tiny-m32-sft-16k.json, a blend of whole books (long context) and
# instruction pairs learned on their responses only (data.loss_mask = sft), at 16,384 tokens with
# document masking, the NTK RoPE base and recompute, on CPU. Then prints, before -> after:
#   - the response-only valid loss on held-out instruction pairs (and the long documents' loss),
#     from the run's own evaluations at step 0 and at the end;
#   - exact match on held-out prompts: greedy generate of each prompt up to EOD;
#   - seconds per step and peak memory at 16,384 tokens, next to `yuanmoe bench` for the same shape.
# Needs ./scripts/demo.sh first (its checkpoint and tokenizer). Extra arguments go to `yuanmoe train`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

demo=runs/tiny-m32
run=runs/tiny-m32-sft-16k
config=configs/tiny-m32-sft-16k.json
[ -d "$demo/checkpoints" ] || { echo "sft-demo: $demo has no checkpoint: run ./scripts/demo.sh first" >&2; exit 1; }
./scripts/make-sft-data.sh

build/yuanmoe train --config "$config" --run-dir "$run" "$@"

echo
echo "exact match on $(wc -l <data/sft/books_test_prompts.txt) held-out prompts (greedy, up to EOD):"
generate() { build/yuanmoe generate --checkpoint "$1" --prompts data/sft/books_test_prompts.txt --temperature 0 \
               --max-new-tokens 8 >"$2"; }
generate "$demo" "$run/answers_before.jsonl"
generate "$run" "$run/answers_after.jsonl"

echo "bench: the same step (shape, weights, recompute) on random tokens and on the run's own data:"
build/yuanmoe bench --config "$config" --step-only --steps 1 --warmup 1 --json "$run/bench_random.json" >/dev/null
build/yuanmoe bench --config "$config" --step-only --steps 2 --warmup 1 --data --json "$run/bench_data.json" >/dev/null
build/yuanmoe bench --config "$config" --step-only --steps 2 --warmup 1 --data --json "$run/bench_long.json" \
  --set data.blend=null --set data.train_prefix=data/sft/long_train --set data.valid_prefix=data/sft/long_valid >/dev/null

"$YUANMOE_PYTHON" - "$run" <<'PY'
import json, statistics, sys
run = sys.argv[1]
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
evals = [l for l in lines if l.get("split") == "valid"]
steps = [l for l in lines if "tokens_per_s" in l]
first, last = evals[0], evals[-1]
print(f"\nvalid loss, step {first['step']} -> {last['step']}:")
for name in last.get("sources", {}):
    a, b = first["sources"][name], last["sources"][name]
    what = "response tokens only" if name == "books" else "every token"
    print(f"  {name:6s} {a['loss']:.4f} -> {b['loss']:.4f}   ({b['tokens']} labels, {what})")
answers = [json.loads(l)["answer"] for l in open("data/sft/books_test.jsonl")]
for when in ("before", "after"):
    got = [json.loads(l)["completion"].strip() for l in open(f"{run}/answers_{when}.jsonl")]
    right = sum(g == a for g, a in zip(got, answers))
    print(f"exact match {when:6s}: {right}/{len(answers)} = {100.0 * right / len(answers):.1f} %   e.g. {got[:3]}")
# Steps 2.. (the first warms up); a window of whole books runs the full causal attention, a window
# of ~350 short instruction pairs a block-diagonal one: two kinds of step, told apart by time.
seconds = [16384 / l["tokens_per_s"] for l in steps[1:]] or [16384 / steps[0]["tokens_per_s"]]
split = (min(seconds) + max(seconds)) / 2
slow, fast = [s for s in seconds if s > split], [s for s in seconds if s <= split]
step_s = statistics.median(seconds)
first_peak, peak = steps[0].get("peak_rss_mib", 0), max(l.get("peak_rss_mib", 0) for l in steps)
print(f"train at 16,384 tokens: {step_s:.1f} s/step (median of {len(seconds)} steps; "
      f"{statistics.median(slow):.1f} s for the {len(slow)} slower, {statistics.median(fast):.1f} s for the {len(fast)} faster), "
      f"peak RSS {first_peak} MiB after step 1, {peak} MiB at the end")
# Each kind of window against bench on the same kind: the blend's first windows are instruction
# pairs, the long source's are whole books.
for kind, what, train_s in (("random", "random tokens", step_s), ("data", "instruction pairs", statistics.median(fast)),
                            ("long", "whole books", statistics.median(slow))):
    bench = json.load(open(f"{run}/bench_{kind}.json"))
    b_s = bench["median_step_seconds"]
    b_mib = bench["peak_rss_bytes"] / 2**20
    print(f"bench on {what:17s}: {b_s:5.1f} s/step, peak RSS {b_mib:5.0f} MiB   train / bench: {train_s / b_s:.2f}x time, "
          f"{first_peak / b_mib:.2f}x memory after step 1")
PY
