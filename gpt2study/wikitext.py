"""WikiText-103 (raw, v1) tokenised into train.bin / val.bin / test.bin for pretraining (the
library of data/wikitext103/prepare.py).

Its own train / valid / test split is kept. Articles (the lines ` = Title = `) are the
documents: each is followed by the end-of-text token. The release zip is downloaded from the
first of mirrors() that serves it whole (its size and sha256 checked), or taken from --src.
"""

import hashlib
import re
import zipfile
from pathlib import Path

from gpt2study.download import download
from gpt2study.text_data import write_dataset
from model import UserError

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "wikitext103"  # beside data/wikitext103/prepare.py
ZIP_NAME = "wikitext-103-raw-v1.zip"
# The release as Salesforce published it: 191,984,949 bytes; the sha256 is the one the Hub shows in the
# Git LFS details of both copies below, and the one a Julia DataDeps registration pins for the original
# S3 file: independent records of one file. (Not downloadable where this was written, so not recomputed.)
ZIP_SIZE = 191_984_949
ZIP_SHA256 = "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"
# Copies of that zip on the Hugging Face Hub (datasets repos), reached through HF_ENDPOINT if set.
HUB_COPIES = (("mattdangerw/wikitext-103-raw", ZIP_NAME), ("segyges/wikitext-103", ZIP_NAME))
SMERITY_URL = f"https://wikitext.smerity.com/{ZIP_NAME}"  # the dataset author's host
S3_URL = f"https://s3.amazonaws.com/research.metamind.io/wikitext/{ZIP_NAME}"  # the original; 403 since 2024
SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
OFFLINE_HINT = (f"offline: copy {ZIP_NAME} (or its unpacked folder) here and run "
                "python data/wikitext103/prepare.py --src PATH, or --url a mirror of your own; or point data_dir "
                "at other prepared data, e.g. python data/text/prepare.py --src '../shared/data/corpus/*.txt' "
                "--out_dir data/corpus and --data_dir=data/corpus")
_TITLE = re.compile(r"^ = [^=].* = $")  # top-level headings only; sections are ' = = ... = = '


def mirrors() -> list[str]:
    """Where the zip is looked for, in order: the author's host, the Hub copies, the original S3 link."""
    from huggingface_hub import hf_hub_url  # the Hub's own URL scheme, honouring HF_ENDPOINT

    hub = [hf_hub_url(repo, file, repo_type="dataset") for repo, file in HUB_COPIES]
    return [SMERITY_URL, *hub, S3_URL]


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
        except zipfile.BadZipFile as e:
            raise UserError(f"{src} is not a readable zip file ({e}); pass the release zip or its unpacked folder"
                            ) from None
    elif src.is_dir():
        for split, name in SPLITS.items():
            found = sorted(src.rglob(name))
            if not found:
                raise UserError(f"{src} holds no {name}: not an unpacked WikiText-103 raw release")
            texts[split] = found[0].read_text(encoding="utf-8")
    else:
        raise UserError(f"--src {src} does not exist")
    return texts


def fetch_release(out_dir: Path, url: str | None = None) -> Path:
    """The release zip in out_dir, downloaded first (from `url` alone if given, else mirrors()) if it is not there."""
    dest = Path(out_dir) / ZIP_NAME
    if dest.exists():
        return dest
    return download([url] if url else mirrors(), dest, sha256=ZIP_SHA256, size=ZIP_SIZE, offline_hint=OFFLINE_HINT)


def prepare(src: Path | None = None, out_dir: Path = DEFAULT_OUT, url: str | None = None) -> dict:
    """Tokenise the release (`src`: the zip or its folder; else downloaded into out_dir) into out_dir."""
    src = Path(src) if src else fetch_release(out_dir, url)
    texts = read_release(src)
    splits = {split: split_articles(text) for split, text in texts.items()}
    digest = hashlib.sha256(b"".join(t.encode() for t in texts.values())).hexdigest()
    return write_dataset(splits, Path(out_dir), [str(src)], digest)


def ensure_prepared(data_dir) -> bool:
    """Prepare WikiText-103 in data_dir if that is the default folder and holds no train.bin yet;
    True if it did. (A download needs the network: without it, one line says what to do.)"""
    data_dir = Path(data_dir)
    if (data_dir / "train.bin").exists() or data_dir.resolve() != DEFAULT_OUT:
        return False
    print(f"{data_dir}/train.bin not found: preparing WikiText-103 (a ~190 MB download)")
    prepare(out_dir=data_dir)
    return True
