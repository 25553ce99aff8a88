"""WikiText-2 (raw), the small WikiText: about 2.4M GPT-2 tokens of Wikipedia articles, tokenised
into train.bin / val.bin / test.bin for pretraining on a CPU.

    python data/wikitext2/prepare.py                    # downloads the release (4.7 MB), size and sha256 checked
    python data/wikitext2/prepare.py --src PATH         # offline: the zip, or its unpacked folder
    python data/wikitext2/prepare.py --url URL          # the zip from a mirror of your own (intranet, proxy)

The download tries wikitext.smerity.com, then a copy on the Hugging Face Hub (through HF_ENDPOINT
if set), then the original S3 link; GPT2STUDY_MIRRORS can name mirrors of your own instead
(gpt2study/download.py). Its own train / valid / test split is kept; articles (the lines
` = Title = `) are the documents, each followed by the end-of-text token.
"""

import sys
from pathlib import Path

from gpt2study.cli import load_config, run_main
from gpt2study.settings import WikiText2Config
from gpt2study.wikitext import WIKITEXT2, prepare


def main():
    cfg = load_config(WikiText2Config, sys.argv[1:], doc=__doc__)
    prepare(cfg.src and Path(cfg.src), Path(cfg.out_dir), url=cfg.url, wikitext=WIKITEXT2)


if __name__ == "__main__":
    run_main(main)
