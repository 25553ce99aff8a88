"""Fine-tune a GPT-2 with LoRA on the E2E NLG restaurant task (meaning representation -> sentence).

    python finetune.py config/lora_e2e.py           # our pretrained model
    python finetune.py config/lora_e2e_gpt2m.py     # OpenAI's GPT-2 medium
    torchrun --standalone --nproc_per_node=4 finetune.py config/lora_e2e_gpt2m.py

Only the adapter is trained and saved (out_dir/checkpoint/adapter.safetensors, a few MB);
`--init_from=resume` continues an interrupted run exactly. The loss counts the reference
tokens only, never the prompt.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import UserError, default_base, load_config, load_model, run_main
from data.e2e.prepare import DEFAULT_OUT, ensure_prepared, load_prepared
from lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from model import IGNORE_INDEX
from tokenizer import EOT
from trainer import TrainConfig, check_out_dir, fit, setup_runtime, teardown

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class FinetuneConfig(TrainConfig):
    out_dir: str = "out/lora_e2e"
    init_from: str = ""  # the base: a run folder of ours ('' = the study's latest), gpt2-medium, or 'resume'
    data_dir: str = str(DEFAULT_OUT)  # from data/e2e/prepare.py
    train_subset: int = 0  # > 0: train on this many training pairs (a seeded random choice), for small runs
    max_seq_len: int = 512
    lora_r: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple = ("q", "v")
    dropout: float = 0.0  # the base model's own dropout
    attn_impl: str = "auto"


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


def load_data(cfg: FinetuneConfig) -> tuple[E2EPairs, E2EPairs]:
    data_dir = ensure_prepared(Path(cfg.data_dir))
    train = load_prepared(data_dir, "train")
    if cfg.train_subset:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = sorted(torch.randperm(len(train), generator=g)[:cfg.train_subset].tolist())
        train = [train[i] for i in keep]
    return E2EPairs(train, cfg.max_seq_len), E2EPairs(load_prepared(data_dir, "dev"), cfg.max_seq_len)


def lora_config(cfg: FinetuneConfig) -> LoRAConfig:
    return LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def main():
    cfg = load_config(FinetuneConfig, sys.argv[1:])
    resume_from = check_out_dir(cfg)
    if resume_from is not None:  # the base the run was fine-tuning is recorded in its checkpoint
        base = json.loads((resume_from / "config.json").read_text())["base"]
    else:
        base = cfg.init_from or default_base()
    rt = setup_runtime(cfg)
    try:
        model = load_model(base, dropout=cfg.dropout, attn_impl=cfg.attn_impl)
        if resume_from is not None:
            load_adapter(model, resume_from / ADAPTER_FILE)
        else:
            inject_lora(model, lora_config(cfg))
        model.to(rt.device).train()
        train_set, val_set = load_data(cfg)
        if cfg.max_seq_len > model.config.block_size:
            raise UserError(f"max_seq_len {cfg.max_seq_len} exceeds the base model's context "
                            f"({model.config.block_size}); lower --max_seq_len")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if rt.master:
            print(f"base {base}: {model.num_params() / 1e6:.1f}M parameters, LoRA {lora_config(cfg)}: "
                  f"{trainable:,} trainable; {len(train_set):,} training pairs; device {rt.device}, {cfg.dtype}")

        def export(folder: Path):
            save_adapter(model, folder / ADAPTER_FILE, {"base": str(base)})

        fit(cfg, rt, model, train_set, val_set, export,
            run_info={"base": str(base), "model": asdict(model.config), "lora": asdict(lora_config(cfg))},
            resume_from=resume_from)
    finally:
        teardown(rt)


if __name__ == "__main__":
    run_main(main)
