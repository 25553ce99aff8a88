"""Tokenise UTF-8 text files into train.bin / val.bin for pretraining.

    python data/text/prepare.py --src '../shared/data/corpus/*.txt' --out_dir data/corpus
    python data/text/prepare.py --url https://intranet.example/books.txt --out_dir data/books

Documents are separated by blank lines (or, with --doc_sep=file, each file is one document).
A seeded random choice of whole documents, about --val_fraction of the text, becomes the
validation set, so no document is split between the two. Each output is a flat array of uint16
GPT-2 token ids with the end-of-text token after every document.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

# Run as a script, Python puts data/text/ (not the repo root) on sys.path; the library lives at the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import UserError, load_config, run_main, setting
from data.text.dataset import fetch_sources, prepare


@dataclass
class TextConfig:
    src: tuple[str, ...] = setting((), "files, folders (their *.txt) or globs; several: comma-separated")
    url: tuple[str, ...] = setting((), "text files to download first (into OUT_DIR/sources/); comma-separated")
    out_dir: str = setting("", "output folder for train.bin, val.bin and meta.json (required)")
    val_fraction: float = setting(0.01, "share of the text, in whole documents, for validation", above=0, below=1)
    seed: int = setting(0, "seed of the random choice of validation documents")
    doc_sep: str = setting("blank", "documents are separated by blank lines, or each file is one",
                           choices=("blank", "file"))

    def check(self):
        if not self.src and not self.url:
            raise UserError("give the text with --src FILES (or --url URL)")
        if not self.out_dir:
            raise UserError("give --out_dir: the folder for train.bin, val.bin and meta.json")


def main():
    cfg = load_config(TextConfig, sys.argv[1:], doc=__doc__)
    out_dir = Path(cfg.out_dir)
    sources = list(cfg.src) + fetch_sources(cfg.url, out_dir)
    prepare(sources, out_dir, cfg.val_fraction, cfg.seed, cfg.doc_sep)


if __name__ == "__main__":
    run_main(main)
