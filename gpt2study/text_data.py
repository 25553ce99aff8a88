"""Local UTF-8 text files tokenised into train.bin / val.bin for pretraining (the library of
data/text/prepare.py; data/wikitext103 writes its splits through `write_dataset` too).

Documents are separated by blank lines (or, with doc_sep="file", each file is one document).
A seeded random choice of whole documents, about val_fraction of the text, becomes the
validation set, so no document is split between the two. Each output is a flat array of uint16
GPT-2 token ids with the end-of-text token after every document.
"""

import glob
import hashlib
import json
import random
import re
import urllib.parse
from pathlib import Path

import numpy as np

from gpt2study.download import download, make_out_dir
from gpt2study.files import replacing
from gpt2study.tokenizer import EOT, VOCAB_SIZE, encode_batch
from model import UserError


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
    with replacing(path) as tmp:
        ids.tofile(tmp)
    return len(ids)


def write_dataset(splits: dict[str, list[str]], out_dir: Path, sources: list[str], sha256: str | None = None) -> dict:
    """Write <split>.bin for each split and meta.json describing them; returns the meta."""
    assert VOCAB_SIZE <= 2**16, "uint16 storage needs a vocabulary under 65,536"
    make_out_dir(out_dir)
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


def fetch_sources(urls, out_dir: Path) -> list[str]:
    """Each URL's file, downloaded into out_dir/sources/ (text of the user's own: no checksum is known,
    so what is checked is that it arrived whole and, when read, that it is UTF-8)."""
    paths: list[Path] = []
    for i, url in enumerate(urls):
        name = Path(urllib.parse.urlparse(url).path).name or f"source{i}.txt"
        dest = out_dir / "sources" / name
        if dest in paths:
            dest = dest.with_name(f"{i}-{name}")
        paths.append(download(url, dest, offline_hint=f"offline: fetch {url}, then pass the file with --src"))
    return [str(p) for p in paths]
