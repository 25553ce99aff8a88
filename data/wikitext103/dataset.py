"""WikiText-103 (raw) tokenised into train.bin / val.bin / test.bin for pretraining.

    python data/wikitext103/prepare.py                  # downloads the release (~190 MB)
    python data/wikitext103/prepare.py --src PATH       # offline: the zip, or its unpacked folder

Its own train / valid / test split is kept. Articles (the lines ` = Title = `) are the
documents: each is followed by the end-of-text token.
"""

import argparse
import hashlib
import re
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from common import UserError, download, run_main
from data.text.prepare import write_dataset

HERE = Path(__file__).resolve().parent
URLS = ("https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip")
SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
OFFLINE_HINT = ("offline: copy wikitext-103-raw-v1.zip (or its unpacked folder) here and run "
                "python data/wikitext103/prepare.py --src PATH, or point data_dir at other prepared data, e.g. "
                "python data/text/prepare.py --src '../shared/data/corpus/*.txt' --out_dir data/corpus "
                "and --data_dir=data/corpus")
_TITLE = re.compile(r"^ = [^=].* = $")  # top-level headings only; sections are ' = = ... = = '


def split_articles(text: str) -> list[str]:
    articles, current = [], []
    for line in text.splitlines():
        if _TITLE.match(line) and any(part.strip() for part in current):
            articles.append("\n".join(current).strip())
            current = []
        current.append(line)
    if any(part.strip() for part in current):
        articles.append("\n".join(current).strip())
    return articles


def read_release(src: Path) -> dict[str, str]:
    """The three raw files' text from the release zip or from a folder holding them."""
    texts = {}
    if src.is_file():
        try:
            with zipfile.ZipFile(src) as z:
                for split, name in SPLITS.items():
                    member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
                    if member is None:
                        raise UserError(f"{src} has no {name}: not the WikiText-103 raw release")
                    texts[split] = z.read(member).decode("utf-8")
        except zipfile.BadZipFile:
            raise UserError(f"{src} is not a zip file; pass the release zip or its unpacked folder") from None
    elif src.is_dir():
        for split, name in SPLITS.items():
            found = sorted(src.rglob(name))
            if not found:
                raise UserError(f"{src} holds no {name}: not an unpacked WikiText-103 raw release")
            texts[split] = found[0].read_text(encoding="utf-8")
    else:
        raise UserError(f"--src {src} does not exist")
    return texts


def fetch_release(out_dir: Path) -> Path:
    """The release zip in out_dir, downloaded if it is not there yet."""
    dest = out_dir / "wikitext-103-raw-v1.zip"
    if dest.exists():
        return dest
    for i, url in enumerate(URLS):
        try:
            return download(url, dest, OFFLINE_HINT)
        except UserError:
            if i == len(URLS) - 1:
                raise
    return dest


def prepare(src: Path | None = None, out_dir: Path = HERE) -> dict:
    src = src or fetch_release(out_dir)
    texts = read_release(src)
    splits = {split: split_articles(text) for split, text in texts.items()}
    digest = hashlib.sha256(b"".join(t.encode() for t in texts.values())).hexdigest()
    return write_dataset(splits, out_dir, [str(src)], digest)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="wikitext-103-raw-v1.zip or its unpacked folder (default: download)")
    p.add_argument("--out_dir", type=Path, default=HERE)
    a = p.parse_args()
    prepare(a.src, a.out_dir)


if __name__ == "__main__":
    run_main(main)
