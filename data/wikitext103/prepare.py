"""WikiText-103 (raw) tokenised into train.bin / val.bin / test.bin for pretraining.

    python data/wikitext103/prepare.py                  # downloads the release (~190 MB), size and sha256 checked
    python data/wikitext103/prepare.py --src PATH       # offline: the zip, or its unpacked folder
    python data/wikitext103/prepare.py --url URL        # the zip from a mirror of your own (intranet, proxy)

The download tries wikitext.smerity.com, then copies on the Hugging Face Hub (through
HF_ENDPOINT if set), then the original S3 link; GPT2STUDY_MIRRORS can name mirrors of your own
instead (gpt2study/download.py). Its own train / valid / test split is kept; articles (the lines
` = Title = `) are the documents, each followed by the end-of-text token.
"""

import sys
from pathlib import Path

from gpt2study.cli import load_config, run_main
from gpt2study.settings import WikiTextConfig
from gpt2study.wikitext import WIKITEXT103, prepare


def main():
    cfg = load_config(WikiTextConfig, sys.argv[1:], doc=__doc__)
    prepare(cfg.src and Path(cfg.src), Path(cfg.out_dir), url=cfg.url, wikitext=WIKITEXT103)


if __name__ == "__main__":
    run_main(main)
