"""Tokenise UTF-8 text files into train.bin / val.bin for pretraining.

    python data/text/prepare.py --src 'books/*.txt' --out_dir data/corpus
    python data/text/prepare.py --url https://intranet.example/books.txt --out_dir data/books

Documents are separated by blank lines (or, with --doc_sep=file, each file is one document).
A seeded random choice of whole documents, about --val_fraction of the text, becomes the
validation set, so no document is split between the two. Each output is a flat array of uint16
GPT-2 token ids with the end-of-text token after every document.
"""

import sys
from pathlib import Path

from gpt2study.cli import load_config, run_main
from gpt2study.settings import TextConfig
from gpt2study.text_data import fetch_sources, prepare


def main():
    cfg = load_config(TextConfig, sys.argv[1:], doc=__doc__)
    out_dir = Path(cfg.out_dir)
    sources = list(cfg.src) + fetch_sources(cfg.url, out_dir)
    prepare(sources, out_dir, cfg.val_fraction, cfg.seed, cfg.doc_sep)


if __name__ == "__main__":
    run_main(main)
