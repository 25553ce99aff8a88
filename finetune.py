"""Fine-tune a GPT-2 with LoRA on the E2E NLG restaurant task (meaning representation -> sentence).

    python finetune.py config/lora_e2e.py           # our pretrained model
    python finetune.py config/lora_e2e_gpt2m.py     # OpenAI's GPT-2 medium
    torchrun --standalone --nproc_per_node=4 finetune.py config/lora_e2e_gpt2m.py

Only the adapter is trained and saved (out_dir/checkpoint/adapter.safetensors, a few MB);
`--init_from=resume` continues an interrupted run exactly. The loss counts the reference
tokens only, never the prompt.
"""

import dataclasses
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from gpt2study.checkpoints import ADAPTER_FILE, check_out_dir, refuse_contradictions, resumed_settings, run_info
from gpt2study.cli import load_config, pick, run_main
from gpt2study.e2e_data import ensure_prepared, load_prepared, tokenize_example
from gpt2study.e2e_slots import check, mr_of_reference
from gpt2study.folder_lock import hold
from gpt2study.loading import load_base, resolve
from gpt2study.settings import FinetuneConfig
from gpt2study.tokenizer import EOT
from gpt2study.training import check_resume, fit, once_per_run, setup_runtime, teardown, world_size
from kernels.linear_cross_entropy import IGNORE_INDEX
from lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from model import ModelOptions, UserError


class E2EPairs:
    """Prompt + reference sequences, right-padded per batch; targets only on the reference."""

    def __init__(self, records: list[dict], max_seq_len: int):
        self.examples = [(r["prompt"], r["target"]) for r in records]
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices):
        seqs, targets = [], []
        for i in indices:
            prompt, target = self.examples[i]
            seq = (prompt + target)[:self.max_seq_len + 1]
            seqs.append(seq[:-1])
            # position t predicts seq[t+1]; prompt tokens are given, not predicted
            targets.append(([IGNORE_INDEX] * (len(prompt) - 1) + target)[:len(seq) - 1])
        T = max(map(len, seqs))
        x = torch.full((len(seqs), T), EOT, dtype=torch.long)
        y = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for row, (s, t) in enumerate(zip(seqs, targets)):
            x[row, :len(s)] = torch.tensor(s)
            y[row, :len(t)] = torch.tensor(t)
        return x, y


def as_trained(record: dict, how: str) -> dict | None:
    """A training pair as train_refs trains it, or None when it is left out. About half the crowd-written
    references leave out, change or add a slot of their MR, and a model trained on them does the same.
    'checked': only the pairs whose reference says exactly its MR; 'mr_of_ref': the MR made what its
    reference says (e2e_slots.mr_of_reference)."""
    if how == "all":
        return record
    if how == "checked":
        return record if check(record["mr"], record["ref"]).errors == 0 else None
    mr = mr_of_reference(record["mr"], record["ref"])
    if mr is None:
        return None
    return record if mr == record["mr"] else {**record, "mr": mr, "prompt": tokenize_example(mr, record["ref"])[0]}


def training_pairs(cfg: FinetuneConfig, records: list[dict], master: bool) -> list[dict]:
    """The pairs to train on, in the prepared order: with train_subset, the first that many (as
    train_refs trains them) of a seeded random order."""
    order = range(len(records))
    if cfg.train_subset:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    chosen, looked = [], 0
    for i in order:
        if cfg.train_subset and len(chosen) == cfg.train_subset:
            break
        looked += 1
        pair = as_trained(records[i], cfg.train_refs)
        if pair is not None:
            chosen.append((i, pair))
    if cfg.train_refs != "all" and master:
        rewritten = sum(pair is not records[i] for i, pair in chosen)
        print(f"train_refs={cfg.train_refs}: {len(chosen):,} of {looked:,} training pairs kept"
              + (f", {rewritten:,} with the MR their reference says" if cfg.train_refs == "mr_of_ref" else ""))
    return [pair for _, pair in sorted(chosen)]


def load_data(cfg: FinetuneConfig, rt) -> tuple[E2EPairs, E2EPairs]:
    data_dir = Path(cfg.data_dir)
    once_per_run(rt, lambda: ensure_prepared(data_dir))
    train = training_pairs(cfg, load_prepared(data_dir, "train"), rt.master)
    if not train:
        raise UserError(f"no training pair of {data_dir} passes the slot check; use --train_refs=all")
    return E2EPairs(train, cfg.max_seq_len), E2EPairs(load_prepared(data_dir, "dev"), cfg.max_seq_len)


def resumed_lora(cfg: FinetuneConfig, recorded: dict) -> LoRAConfig:
    """The LoRA the resumed run trains."""
    lora = LoRAConfig(**recorded)
    refuse_contradictions(cfg, asdict(lora), f"--init_from=resume: the run in {cfg.out_dir}",
                          "drop the setting or start a new run in another --out_dir")
    return lora


def main():
    cfg = load_config(FinetuneConfig, sys.argv[1:], doc=__doc__)
    with hold(cfg.out_dir, "run"):  # before anything reads or writes the run's folder
        run(cfg)


def run(cfg: FinetuneConfig):
    resume_from = check_out_dir(cfg.out_dir, cfg.init_from)
    if resume_from is not None:  # the base and the LoRA are the run's own, recorded in its checkpoint
        info = run_info(resume_from)
        if "lora" not in info:
            raise UserError(f"{cfg.out_dir} holds a pretraining run, not a LoRA run: resume it with python train.py "
                            f"--out_dir={cfg.out_dir} --init_from=resume")
        cfg = resumed_settings(cfg, resume_from)
        check_resume(cfg, resume_from, world_size())
        base, lora = info["base"], resumed_lora(cfg, info["lora"])
        cfg = dataclasses.replace(cfg, **asdict(lora))
    else:
        base, lora = resolve(cfg.init_from), pick(LoRAConfig, cfg)
    rt = setup_runtime(cfg)
    try:
        model = load_base(base, **asdict(pick(ModelOptions, cfg)))
        if cfg.max_seq_len > model.config.block_size:
            raise UserError(f"max_seq_len {cfg.max_seq_len} exceeds the base model's context "
                            f"({model.config.block_size}); lower --max_seq_len")
        if resume_from is not None:
            load_adapter(model, resume_from / ADAPTER_FILE)
        else:
            inject_lora(model, lora)
        model.to(rt.device).train()
        train_set, val_set = load_data(cfg, rt)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if rt.master:
            print(f"base {base}: {model.num_params() / 1e6:.1f}M parameters, LoRA r={lora.lora_r} alpha="
                  f"{lora.lora_alpha:g} on {', '.join(lora.lora_targets)}: {trainable:,} trainable; "
                  f"{len(train_set):,} training pairs; device {rt.device}, {cfg.dtype}")

        def export(folder: Path):
            save_adapter(model, folder / ADAPTER_FILE, {"base": str(base)})

        fit(cfg, rt, model, train_set, val_set, export,
            run_info={"base": str(base), "model": asdict(model.config), "lora": asdict(lora)},
            resume_from=resume_from)
    finally:
        teardown(rt)


if __name__ == "__main__":
    run_main(main)
