"""What the end-to-end Python tests share: a list of named checks with one report at the end,
and the small synthetic corpus they tokenize with the real `yuanmoe prepare-data`."""

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
