"""What the end-to-end Python tests share: a list of named checks with one report at the end,
the small synthetic corpus they tokenize with the real `yuanmoe prepare-data`, and a tiny model
config over it."""

import os
import random
import shutil
import subprocess


class Checks:
    def __init__(self):
        self.failures = []

    def __call__(self, ok, message):
        print(("ok   " if ok else "FAIL ") + message, flush=True)
        if not ok:
            self.failures.append(message)

    def finish(self, work):
        """Removes `work` unless something failed (or KEEP_WORK is set); the exit code."""
        if self.failures or os.environ.get("KEEP_WORK"):
            print("work dir kept: " + work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if self.failures:
            print("%d check(s) failed" % len(self.failures))
            return 1
        print("all checks passed")
        return 0


def write_corpus(path, documents, seed=7):
    """`documents` blank-line-separated documents of 3-8 short sentences over 16 words."""
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat log and then it was red big".split()
    with open(path, "w") as f:
        for _ in range(documents):
            for _ in range(rng.randint(3, 8)):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(4, 11))) + ".\n")
            f.write("\n")


def prepare_data(binary, work, documents=200):
    """A 300-piece tokenizer and the datasets of `write_corpus` in `work`: data.model,
    data_train and data_valid (a tenth of the documents)."""
    write_corpus(os.path.join(work, "corpus.txt"), documents=documents)
    subprocess.run([binary, "prepare-data", "--input", "corpus.txt", "--output", "data", "--train-tokenizer", "300",
                    "--valid-fraction", "0.1"], cwd=work, check=True, capture_output=True)


def tiny_config(checkpoint, log, max_steps=6):
    """A 2-layer, 4-expert config over prepare_data's files (paths relative to its `work`),
    evaluating every 3 steps; `checkpoint` and `log` are the config's blocks."""
    return {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "head_dim": 16, "rotary_dim": 8,
                  "vocab_size": 300, "max_seq_length": 16},
        "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32},
        "train": {"seq_length": 16, "micro_batch_size": 2, "global_batch_size": 2, "max_steps": max_steps, "lr": 3e-3,
                  "warmup_steps": 1, "eval_interval": 3, "eval_steps": 2},
        "data": {"train_prefix": "data_train", "valid_prefix": "data_valid", "tokenizer": "data.model"},
        "checkpoint": checkpoint,
        "log": log,
    }
