"""Pretrain GPT-2 from scratch on prepared token files.

    python train.py config/pretrain.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain.py   # several GPUs (DDP)

`init_from`: 'scratch' (a new model), 'resume' (continue out_dir's run exactly), or the
out_dir of an earlier run, whose weights start a new run (as config/pretrain_continue.py does).
"""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common import UserError, load_config, load_model, run_main
from model import GPT, GPTConfig
from trainer import TrainConfig, check_out_dir, fit, setup_runtime, teardown

WIKITEXT_DIR = Path(__file__).resolve().parent / "data" / "wikitext103"


@dataclass
class PretrainConfig(TrainConfig):
    out_dir: str = "out/pretrain"
    data_dir: str = "data/wikitext103"  # holds train.bin and val.bin from a data/*/prepare.py
    # the model (ignored when init_from loads an earlier run's weights)
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = True
    attn_impl: str = "auto"


class TokenBlocks:
    """A token file cut into non-overlapping blocks: example i is tokens[i*T : (i+1)*T], its
    targets the same window shifted by one."""

    def __init__(self, path: Path, block_size: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size = block_size
        if len(self) == 0:
            raise UserError(f"{path} holds {len(self.tokens)} tokens, fewer than one block of {block_size} + 1")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def batch(self, indices):
        T = self.block_size
        rows = np.stack([self.tokens[i * T:(i + 1) * T + 1] for i in indices]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def load_data(cfg: PretrainConfig, block_size: int) -> tuple[TokenBlocks, TokenBlocks]:
    data_dir = Path(cfg.data_dir)
    if not (data_dir / "train.bin").exists() and data_dir.resolve() == WIKITEXT_DIR:
        from data.wikitext103.prepare import prepare

        print(f"{data_dir}/train.bin not found: preparing WikiText-103 (a ~190 MB download)")
        prepare(out_dir=data_dir)
    for split in ("train", "val"):
        if not (data_dir / f"{split}.bin").exists():
            raise UserError(f"{data_dir}/{split}.bin not found: prepare data first, e.g. python data/text/prepare.py "
                            f"--src 'FILES' --out_dir {data_dir}, or point --data_dir at prepared data")
    return TokenBlocks(data_dir / "train.bin", block_size), TokenBlocks(data_dir / "val.bin", block_size)


def build_model(cfg: PretrainConfig, resume_from: Path | None) -> GPT:
    runtime = {"dropout": cfg.dropout, "attn_impl": cfg.attn_impl}
    if resume_from is not None:
        return GPT.from_file(resume_from / "model.safetensors", **runtime)
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                             dropout=cfg.dropout, bias=cfg.bias, attn_impl=cfg.attn_impl))
    return load_model(cfg.init_from, **runtime)


def main():
    cfg = load_config(PretrainConfig, sys.argv[1:])
    resume_from = check_out_dir(cfg)
    rt = setup_runtime(cfg)
    try:
        model = build_model(cfg, resume_from).to(rt.device)
        train_set, val_set = load_data(cfg, model.config.block_size)
        if rt.master:
            print(f"model: {model.num_params() / 1e6:.1f}M parameters ({model.config.n_layer} layers, "
                  f"{model.config.n_head} heads, {model.config.n_embd} dims); {len(train_set):,} training blocks "
                  f"of {model.config.block_size} tokens; device {rt.device}, {cfg.dtype}, {rt.world} process(es)")
        fit(cfg, rt, model, train_set, val_set, export=lambda folder: model.save(folder / "model.safetensors"),
            run_info={"model": asdict(model.config), "data_dir": cfg.data_dir}, resume_from=resume_from)
    finally:
        teardown(rt)


if __name__ == "__main__":
    run_main(main)
