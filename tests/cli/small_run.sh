# Shared by the fault-injection scripts: a small corpus of synthetic sentences tokenized by the
# real prepare-data, and run.json, a 2-layer 8-expert model that checkpoints every 5 steps over
# 60 steps (dropout on, so the RNG state must survive too). make_small_run BINARY NAME makes a
# fresh /tmp/NAME-XXXXXX (removed when the script exits), enters it and prepares all of it there.
make_small_run() {
  local bin=$1
  work=$(mktemp -d "/tmp/$2-XXXXXX")
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
}
