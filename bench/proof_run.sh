#!/usr/bin/env bash
# The documented offline proof run on a CPU (README, "Proof run"): prepare the local corpus and
# E2E, pretrain the small model, LoRA-fine-tune it on an E2E subset, beam-decode and score the
# 630 test MRs, and sample the ten prompts. Wall times go to out/proof/times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out/proof
step() {  # step NAME COMMAND...: run, log, time
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "out/proof/$name.log" 2>&1
  echo "$name: $((SECONDS - t0)) s" | tee -a out/proof/times.txt
}
: > out/proof/times.txt
step prepare_corpus python data/text/prepare.py --src '../shared/data/corpus/*.txt' --out_dir data/corpus
step prepare_e2e python data/e2e/prepare.py --src ../shared/data/e2e/e2e-dataset.zip
step pretrain python train.py config/pretrain_small.py --progress=False
step sample python sample.py --prompts prompts.txt --ckpt out/pretrain_small --max_new_tokens 40
step finetune python finetune.py config/lora_e2e_small.py --progress=False
step e2e_eval python e2e_eval.py --configs config/lora_e2e_small.py --out_dir out/e2e_eval_small
