"""End-to-end check of `yuanmoe prepare-data` with an independent reader.

The reader below is written from the MMIDIDX description alone (Megatron-LM's indexed dataset,
docs/data.md), with numpy, not from yuanmoe's C++ code. The test writes its own small corpus
(plain text and JSONL), runs the real binary, reads both splits back and decodes every document
through the tokenizer's .vocab file (no SentencePiece needed) to compare it with the input text.

usage: python3 test_prepare_data.py BUILD_DIR/yuanmoe
"""

import json
import math
import random
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
          6: np.float64, 7: np.float32, 8: np.uint16}


def read_indexed(prefix):
    """Returns (dtype code, list of sequences as int64 arrays, document index)."""
    idx = Path(prefix + ".idx").read_bytes()
    assert idx[:9] == MAGIC, "bad magic"
    (version,) = struct.unpack_from("<Q", idx, 9)
    assert version == 1, version
    (code,) = struct.unpack_from("<B", idx, 17)
    seq_count, doc_count = struct.unpack_from("<QQ", idx, 18)
    offset = 34
    sizes = np.frombuffer(idx, np.int32, seq_count, offset)
    offset += sizes.nbytes
    pointers = np.frombuffer(idx, np.int64, seq_count, offset)
    offset += pointers.nbytes
    doc_index = np.frombuffer(idx, np.int64, doc_count, offset)
    offset += doc_index.nbytes
    assert offset == len(idx), (offset, len(idx))
    assert doc_index[0] == 0 and doc_index[-1] == seq_count
    dtype = np.dtype(DTYPES[code])
    data = np.memmap(prefix + ".bin", dtype=np.uint8, mode="r") if seq_count else np.zeros(0, np.uint8)
    expected_pointer = 0
    sequences = []
    for size, pointer in zip(sizes, pointers):
        assert pointer == expected_pointer, "sequences are not contiguous"
        expected_pointer += int(size) * dtype.itemsize
        sequences.append(np.frombuffer(data, dtype, int(size), int(pointer)).astype(np.int64))
    assert expected_pointer == len(data), "bin size does not match the index"
    return code, sequences, doc_index


def load_pieces(vocab_path):
    return [line.split("\t")[0] for line in Path(vocab_path).read_text(encoding="utf-8").splitlines()]


def decode(ids, pieces):
    """SentencePiece decoding for our models: byte pieces <0xNN>, '▁' = space, one dummy prefix."""
    out = bytearray()
    for i in ids:
        piece = pieces[i]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(int(piece[3:5], 16))
        elif piece in ("<unk>", "<s>", "</s>", "<pad>"):
            raise AssertionError(f"unexpected control piece {piece}")
        else:
            out += piece.replace("\u2581", " ").encode("utf-8")
    text = out.decode("utf-8")
    return text[1:] if text.startswith(" ") else text


def make_documents(n, seed):
    rng = random.Random(seed)
    words = ("the of and to a in is that for it was with jury said Friday Atlanta "
             "café naïve 1961 42 über").split()
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "."
                 for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(lines))
    return docs


def main():
    binary = sys.argv[1]
    docs = make_documents(150, 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a.txt").write_text("".join(d + "\n\n" for d in docs[:70]), encoding="utf-8")
        (tmp / "b.jsonl").write_text(
            "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[70:])),
            encoding="utf-8")
        prefix = str(tmp / "ds")
        fraction = 0.1
        run = subprocess.run(
            [binary, "prepare-data", "--input", str(tmp / "a.txt"), str(tmp / "b.jsonl"),
             "--output", prefix, "--train-tokenizer", "350", "--valid-fraction", str(fraction),
             "--workers", "2"],
            capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr

        pieces = load_pieces(prefix + ".vocab")
        meta = json.loads(Path(prefix + "_train.meta.json").read_text())
        eod = meta["tokenizer"]["eod_id"]
        assert pieces[eod] == "<eod>", pieces[eod]
        assert meta["tokenizer"]["vocab_size"] == len(pieces) == 350

        splits = {}
        for split in ("train", "valid"):
            code, sequences, doc_index = read_indexed(f"{prefix}_{split}")
            assert code == 8, f"vocab 350 must be stored as uint16 (code 8), got {code}"
            assert list(doc_index) == list(range(len(sequences) + 1)), "one sequence per document"
            splits[split] = sequences

        next_of = {"train": 0, "valid": 0}
        for i, doc in enumerate(docs):
            split = "valid" if math.floor((i + 1) * fraction + 0.5) > math.floor(i * fraction + 0.5) else "train"
            tokens = splits[split][next_of[split]]
            next_of[split] += 1
            assert tokens[-1] == eod, f"document {i} does not end in EOD"
            assert eod not in tokens[:-1]
            text = decode(tokens[:-1], pieces)
            assert text == doc, f"document {i}: {text!r} != {doc!r}"
        assert next_of == {k: len(v) for k, v in splits.items()}, next_of
        assert next_of["valid"] == 15
    print(f"ok: {len(docs)} documents decoded from {prefix}_{{train,valid}}")


if __name__ == "__main__":
    main()
