"""Prepare the E2E NLG restaurant dataset (official release v1.0.0) for LoRA fine-tuning.

    python data/e2e/prepare.py                         # downloads the release (1.5 MB, sha256 checked)
    python data/e2e/prepare.py --src e2e-dataset.zip   # offline: a local copy, the zip or its unpacked folder
    python data/e2e/prepare.py --url URL               # the zip from a mirror of your own

Without --src the zip is downloaded into OUT_DIR (once), from GitHub, or from the mirrors
GPT2STUDY_MIRRORS names (gpt2study/download.py). OUT_DIR (default data/e2e/prepared)
gets train.jsonl and dev.jsonl (one pair a line: mr, ref, prompt ids, target ids), test.jsonl
(one MR group a line: mr, refs, prompt ids) and meta.json (counts, token statistics, checksums).
"""

import sys
from pathlib import Path

from gpt2study.cli import load_config, run_main
from gpt2study.e2e_data import prepare
from gpt2study.e2e_release import SPLIT_FILES, fetch_release
from gpt2study.settings import E2EDataConfig


def main(argv=None) -> None:
    cfg = load_config(E2EDataConfig, sys.argv[1:] if argv is None else argv, doc=__doc__)
    out_dir = Path(cfg.out_dir)
    meta = prepare(Path(cfg.src) if cfg.src else fetch_release(out_dir, cfg.url), out_dir)
    for split in SPLIT_FILES:
        c, t = meta["counts"][split], meta["tokens"][split]
        tokens, longest = ", ".join(f"{k} {v:,}" for k, v in t.items()), meta["max_len"][split]
        print(f"{split:5s}: {c['pairs']:6,} pairs, {c['mrs']:5,} MRs; tokens: {tokens}; max length {longest}")
    print(f"wrote {out_dir}/{{train,dev,test}}.jsonl and meta.json")


if __name__ == "__main__":
    run_main(main)
