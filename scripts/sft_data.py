#!/usr/bin/env python3
"""The instruction task and the long-context source of scripts/sft-demo.sh, from the King James
Bible (Debian's bible-kjv: `bible -f "Gen1:1-Rev22:21"` on stdin, "Ge1:1 In the beginning ...").

Task: "Which book of the Bible is this verse from?" -> the book's name: one answer of 66 names of
one to four pieces, decided by vocabulary and style the pretrained model has seen. What a few
dozen steps teach the 4-layer demo model is measured in docs/training.md ("Fine-tuning to 16K"):
the format and the answers' prior, not yet the mapping from verse to book. Five other tasks tried
the same way (bench/results/2026-12-06-sft-tasks: the verse's reference in the prompt, the
reference alone, the verse's last word, its testament, finishing it) did no better at that budget.

Writes into OUT_DIR:
  books.txt          training pairs, Yuan's SFT layout: instruction<sep>response, <n> for newline
  books_heldout.txt  every 50th verse (offset 25), never trained on: the response-only valid loss
  books_test.jsonl   every third held-out verse: {"prompt": "...<sep>", "answer": BOOK} for exact match,
                     and the prompts alone, one per line, in books_test_prompts.txt (generate --prompts)
  long.txt           the long-context source: whole books as documents (text format, a blank line
                     between documents), consecutive short books joined until a document holds
                     at least LONG_WORDS words (most then exceed 16K tokens of data/corpus.model)
"""
import json
import re
import sys
from pathlib import Path

BOOKS = [
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"), ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"), ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"), ("2Ki", "2 Kings"), ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"),
    ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"),
    ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
]
QUESTION = "Which book of the Bible is this verse from?<n>"
HELD_OUT_EVERY, HELD_OUT_OFFSET = 50, 25
LONG_WORDS = 14000


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: bible -f Gen1:1-Rev22:21 | sft_data.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = dict(BOOKS)
    verses = []  # (book, text) in canonical order
    for number, line in enumerate(sys.stdin, 1):
        match = re.match(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", line.rstrip("\n"))
        if not match or match.group(1) not in names:
            sys.exit(f"sft_data.py: stdin:{number}: not a KJV verse line from `bible`: {line.strip()[:60]!r}")
        verses.append((names[match.group(1)], match.group(2).strip()))
    if len(verses) != 31102:
        sys.exit(f"sft_data.py: expected the 31,102 verses of the KJV, read {len(verses)}")

    train, heldout = [], []
    for i, (book, text) in enumerate(verses):
        # '<' never occurs in the KJV text, so neither piece can appear by accident.
        sample = (QUESTION + text, book)
        (heldout if i % HELD_OUT_EVERY == HELD_OUT_OFFSET else train).append(sample)
    (out / "books.txt").write_text("".join(f"{prompt}<sep>{book}\n" for prompt, book in train))
    (out / "books_heldout.txt").write_text("".join(f"{prompt}<sep>{book}\n" for prompt, book in heldout))
    with open(out / "books_test.jsonl", "w") as test, open(out / "books_test_prompts.txt", "w") as prompts:
        for prompt, book in heldout[::3]:
            test.write(json.dumps({"prompt": prompt + "<sep>", "answer": book}) + "\n")
            prompts.write(prompt + "<sep>\n")

    documents, current, words = [], [], 0
    for i, (book, text) in enumerate(verses):
        current.append(text)
        words += len(text.split())
        last_of_book = i + 1 == len(verses) or verses[i + 1][0] != book
        if last_of_book and (words >= LONG_WORDS or i + 1 == len(verses)):
            documents.append("\n".join(current))
            current, words = [], 0
    (out / "long.txt").write_text("\n\n".join(documents) + "\n")
    print(f"sft_data.py: {len(train)} training pairs, {len(heldout)} held out ({len(heldout[::3])} test prompts), "
          f"{len(documents)} long documents of >= {LONG_WORDS} words, in {out}")


if __name__ == "__main__":
    main()
