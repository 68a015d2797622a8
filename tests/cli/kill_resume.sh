#!/usr/bin/env bash
# Kill -9 a training run at random moments (inside steps, evaluations and checkpoint writes),
# rerun the same command each time, and require the final weights, optimizer state and every
# logged loss to equal those of an uninterrupted run, byte for byte.
# usage: kill_resume.sh BINARY
set -euo pipefail
bin=$(realpath "$1")
work=$(mktemp -d /tmp/yuanmoe-kill-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# A small corpus of synthetic sentences, tokenized by the real prepare-data.
awk 'BEGIN { srand(7); split("the a cat dog sat ran on under mat log and then it was red big", w, " ");
  for (d = 0; d < 300; d++) { n = 3 + int(rand() * 6);
    for (s = 0; s < n; s++) { line = ""; k = 4 + int(rand() * 8);
      for (i = 0; i < k; i++) line = line w[1 + int(rand() * 16)] " "; print line "." }
    print "" } }' > corpus.txt
"$bin" prepare-data --input corpus.txt --output data --train-tokenizer 300 --valid-fraction 0.1 > prepare.log

cat > run.json <<'JSON'
{
  "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
            "rotary_dim": 16, "vocab_size": 300, "max_seq_length": 32, "attention_dropout": 0.1},
  "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 64, "aux_loss_coeff": 0.01},
  "train": {"seq_length": 32, "micro_batch_size": 4, "global_batch_size": 8, "max_steps": 60,
            "lr": 3e-3, "warmup_steps": 5, "eval_interval": 20, "eval_steps": 2},
  "data": {"train_prefix": "data_train", "valid_prefix": "data_valid", "tokenizer": "data.model"},
  "checkpoint": {"interval": 5, "keep_last": 2},
  "log": {"interval": 1, "progress": false, "plots": false, "peak_tflops": 1}
}
JSON

"$bin" train --config run.json --run-dir straight > straight.log 2>&1

kills=0 during_write=0
RANDOM=11
for attempt in $(seq 1 30); do
  "$bin" train --config run.json --run-dir killed > "killed.$attempt.log" 2>&1 &
  pid=$!
  # Every other attempt first waits for a checkpoint to exist, so some kills always land after
  # one (start-up is slower on a loaded machine, e.g. under ctest -j2); then kill anywhere from
  # before the first step to late in the run.
  if [ $((attempt % 2)) -eq 0 ]; then
    for _ in $(seq 1 200); do
      [ -e killed/checkpoints/latest ] || ! kill -0 "$pid" 2>/dev/null && break
      sleep 0.1
    done
  fi
  sleep "0.$((RANDOM % 9 + 1))$((RANDOM % 10))"
  if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; break; fi
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  kills=$((kills + 1))
  if compgen -G "killed/checkpoints/.tmp-*" > /dev/null; then during_write=$((during_write + 1)); fi
done
"$bin" train --config run.json --run-dir killed > killed.final.log 2>&1

final=checkpoints/step_00000060
for f in model.safetensors optimizer.safetensors rng.safetensors; do
  cmp "straight/$final/$f" "killed/$final/$f" || { echo "FAIL: $f differs after $kills kills"; exit 1; }
done
losses() { grep -v '"split"' "$1/metrics.jsonl" | sed -E 's/.*"step":([0-9]+),"loss":([^,]+),.*/\1 \2/'; }
diff <(losses straight) <(losses killed) > /dev/null || { echo "FAIL: logged losses differ"; diff <(losses straight) <(losses killed) | head; exit 1; }
[ "$(losses straight | wc -l)" -eq 60 ] || { echo "FAIL: expected 60 train lines"; exit 1; }
resumes=$(cat killed.*.log | grep -c "resumed from" || true)
[ "$resumes" -gt 0 ] || { echo "FAIL: no run resumed from a checkpoint"; exit 1; }
echo "OK: $kills kills, $resumes resumes ($during_write left a partial checkpoint), final weights, optimizer state and 60 losses identical"
