#!/usr/bin/env bash
# A model of the study's shape (6 layers, 768 dims, 12 heads) whose beam-search outputs end the way a
# fine-tuned model's do, for timing beam search on a CPU (bench/results/cpu.md): 300 steps of plain
# language modelling on the E2E training texts ("<linearised MR> || <reference>", one per document), about
# 15 minutes on 2 cores. It is a stand-in for the decoding cost of the study's model, not a good E2E model.
# Then: python bench/beam.py --model out/e2e_lm_6l --n 630
# Offline: E2E_SRC=path/to/e2e-dataset.zip bash bench/beam_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python data/e2e/prepare.py ${E2E_SRC:+--src "$E2E_SRC"}
mkdir -p out/e2e_lm_text
python - <<'PY'
import json
from gpt2study.tokenizer import decode
with open("data/e2e/prepared/train.jsonl") as f, open("out/e2e_lm_text/e2e_train.txt", "w") as out:
    for line in f:
        r = json.loads(line)
        out.write(decode(r["prompt"] + r["target"][:-1]) + "\n\n")  # a blank line ends each document
PY
python data/text/prepare.py --src 'out/e2e_lm_text/*.txt' --out_dir data/e2e_lm
python train.py config/pretrain_small.py --out_dir=out/e2e_lm_6l --data_dir=data/e2e_lm \
  --n_layer=6 --n_head=12 --n_embd=768 --block_size=128 --batch_size=8 --max_iters=300 \
  --lr=6e-4 --min_lr=6e-5 --warmup_iters=20 --eval_interval=100 --eval_iters=5 --log_interval=5
