"""Tokenise local UTF-8 text files into train.bin / val.bin for pretraining.

    python data/text/prepare.py --src '../shared/data/corpus/*.txt' --out_dir data/corpus

Documents are separated by blank lines (or, with --doc_sep=file, each file is one
document). A seeded random choice of whole documents, about --val_fraction of the text,
becomes the validation set, so no document is split between the two. Each output is a flat
array of uint16 GPT-2 token ids with the end-of-text token after every document.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from common import UserError, run_main
from tokenizer import EOT, VOCAB_SIZE, encode_batch


def expand_sources(sources: list[str]) -> list[Path]:
    """Files named by paths, globs or folders (their *.txt files), in a stable order."""
    files = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(src)) if Path(p).is_file()]
        if not found:
            raise UserError(f"--src {src}: no such file, folder of .txt files, or matching glob")
        files += found
    return files


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def split_documents(text: str) -> list[str]:
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def split_train_val(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Whole documents, picked at random, until they hold val_fraction of the characters."""
    if len(docs) < 2:
        raise UserError("the source holds a single document: it cannot be split into train and validation; "
                        "give more text or separate documents with blank lines")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    target, chars, val = val_fraction * sum(map(len, docs)), 0, set()
    for i in order[:-1]:  # at least one document stays in train
        if chars >= target and val:
            break
        val.add(i)
        chars += len(docs[i])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def write_tokens(docs: list[str], path: Path) -> int:
    """uint16 token ids of the documents, each followed by EOT; written atomically."""
    ids = np.fromiter((t for doc in encode_batch(docs) for t in (*doc, EOT)), dtype=np.uint16)
    tmp = path.with_name(path.name + ".tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)
    return len(ids)


def write_dataset(splits: dict[str, list[str]], out_dir: Path, sources: list[str], sha256: str | None = None) -> dict:
    """Write <split>.bin for each split and meta.json describing them; returns the meta."""
    assert VOCAB_SIZE <= 2**16, "uint16 storage needs a vocabulary under 65,536"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": "gpt2", "vocab_size": VOCAB_SIZE, "dtype": "uint16", "sources": sources}
    if sha256:
        meta["sha256"] = sha256
    for split, docs in splits.items():
        meta[f"{split}_documents"] = len(docs)
        meta[f"{split}_tokens"] = write_tokens(docs, out_dir / f"{split}.bin")
        print(f"{split}: {len(docs):,} documents, {meta[f'{split}_tokens']:,} tokens -> {out_dir / f'{split}.bin'}")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prepare(sources: list[str], out_dir: Path, val_fraction: float = 0.01, seed: int = 0,
            doc_sep: str = "blank") -> dict:
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must lie between 0 and 1, not {val_fraction}")
    files = expand_sources(sources)
    docs, digest = [], hashlib.sha256()
    for f in files:
        text = read_text(f)
        digest.update(text.encode())
        docs += [text.strip()] if doc_sep == "file" else split_documents(text)
    train, val = split_train_val(docs, val_fraction, seed)
    return write_dataset({"train": train, "val": val}, out_dir, [str(f) for f in files], digest.hexdigest())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", required=True, help="file, folder or glob (repeatable)")
    p.add_argument("--out_dir", required=True, type=Path)
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc_sep", choices=("blank", "file"), default="blank",
                   help="documents are separated by blank lines, or each file is one document")
    a = p.parse_args()
    prepare(a.src, a.out_dir, a.val_fraction, a.seed, a.doc_sep)


if __name__ == "__main__":
    run_main(main)
