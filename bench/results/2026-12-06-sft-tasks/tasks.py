#!/usr/bin/env python3
"""Instruction tasks from the KJV for the fine-tuning budget study (README.md next to this file).

usage: bible -f Gen1:1-Rev22:21 | tasks.py TASK OUT_DIR
Writes OUT_DIR/train.txt and OUT_DIR/heldout.txt (instruction<sep>response, every 50th verse held
out as in scripts/sft_data.py) and OUT_DIR/test.jsonl + OUT_DIR/test_prompts.txt (exact match).
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from sft_data import BOOKS, HELD_OUT_EVERY, HELD_OUT_OFFSET  # noqa: E402

NEW_TESTAMENT_FROM = 23145  # Matthew 1:1, the first verse of the New Testament


def pairs(task, verses):
    """(index, prompt, answer) of every verse the task uses."""
    new = len(verses) - NEW_TESTAMENT_FROM
    kept_old = {int(k * NEW_TESTAMENT_FROM / new) for k in range(new)}  # as many, evenly spaced
    for i, (reference, book, text) in enumerate(verses):
        last = re.match(r"^(.*\S)\s+([A-Za-z']+)[^A-Za-z']*$", text)
        if task == "book":
            yield i, "Which book of the Bible is this verse from?<n>" + text, book
        elif task == "book_reference":
            yield i, "Which book of the Bible is this verse from?<n>" + reference + " " + text, book
        elif task == "reference":
            yield i, f"Which book is {reference} from?", book
        elif task == "last_word":
            yield i, "What is the last word of this verse?<n>" + text, re.search(r"([A-Za-z']+)[^A-Za-z']*$", text).group(1)
        elif task == "finish" and last:
            yield i, "Finish the verse with its last word:<n>" + last.group(1), last.group(2)
        elif task == "testament":
            # Balanced: every New Testament verse and as many Old Testament ones.
            if i >= NEW_TESTAMENT_FROM or i in kept_old:
                yield i, "Is this verse from the Old or the New Testament?<n>" + text, "New" if i >= NEW_TESTAMENT_FROM else "Old"


def main():
    task, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    names = dict(BOOKS)
    verses = []
    for line in sys.stdin:
        match = re.match(r"^((\d?[A-Za-z]+)\d+:\d+) (.*)$", line.rstrip("\n"))
        verses.append((match.group(1), names[match.group(2)], match.group(3).strip()))
    train, heldout = [], []
    for i, prompt, answer in pairs(task, verses):
        (heldout if i % HELD_OUT_EVERY == HELD_OUT_OFFSET else train).append((prompt, answer))
    (out / "train.txt").write_text("".join(f"{p}<sep>{a}\n" for p, a in train))
    (out / "heldout.txt").write_text("".join(f"{p}<sep>{a}\n" for p, a in heldout))
    test = heldout if task == "testament" else heldout[::3]
    with open(out / "test.jsonl", "w") as t, open(out / "test_prompts.txt", "w") as p:
        for prompt, answer in test:
            t.write(json.dumps({"prompt": prompt + "<sep>", "answer": answer}) + "\n")
            p.write(prompt + "<sep>\n")
    print(f"{task}: {len(train)} training pairs, {len(heldout)} held out, {len(test)} test prompts")


if __name__ == "__main__":
    main()
