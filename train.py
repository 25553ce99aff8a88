"""Pretrain GPT-2 from scratch on prepared token files.

    python train.py config/pretrain.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain.py   # several GPUs (DDP)

`init_from`: 'scratch' (a new model), 'resume' (continue out_dir's run exactly), or any model
(models.py: an earlier run's folder, a file, gpt2, ...) whose weights start a new run, as
config/pretrain_continue.py does.
"""

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gpt2study.checkpoints import MODEL_FILE, check_out_dir, refuse_contradictions, resumed_settings, run_info
from gpt2study.cli import load_config, pick, run_main
from gpt2study.folder_lock import hold
from gpt2study.loading import load_base
from gpt2study.settings import PretrainConfig
from gpt2study.tokenizer import VOCAB_SIZE
from gpt2study.training import check_resume, fit, once_per_run, setup_runtime, teardown, world_size
from model import GPT, GPTConfig, ModelOptions, UserError


class TokenBlocks:
    """A token file cut into non-overlapping blocks: example i is tokens[i*T : (i+1)*T], its
    targets the same window shifted by one."""

    def __init__(self, path: Path, block_size: int, vocab_size: int):
        check_token_file(path, block_size)
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size, self.vocab_size = block_size, vocab_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def batch(self, indices):
        T = self.block_size
        rows = torch.from_numpy(np.stack([self.tokens[i * T:(i + 1) * T + 1] for i in indices]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def check_ids(self, path: Path) -> None:
        """Fail in one line on token ids that are no GPT-2 token or that the model has no embedding for
        (a file made for another vocabulary, or bytes that are not token ids at all)."""
        limit = min(self.vocab_size, VOCAB_SIZE)
        top = int(self.tokens.max())
        if top >= limit:
            at = int(np.argmax(self.tokens >= limit))
            raise UserError(f"{path} holds token id {top} (first at token {at:,}), beyond the vocabulary of "
                            f"{limit}: prepare it with this project's GPT-2 tokenizer (data/text/prepare.py)")


def check_token_file(path: Path, block_size: int) -> None:
    """A token file is a whole number of uint16 ids, at least one block and its next token: checked
    by its size, before it is mapped (a copy cut short has an odd length)."""
    if not path.is_file():
        raise UserError(f"{path} is not a file: expected uint16 token ids written by data/text/prepare.py")
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} is {size:,} bytes, not a whole number of 2-byte token ids: the file is cut short "
                        f"or not a token file; prepare it again (data/text/prepare.py)")
    if size // 2 < block_size + 1:
        raise UserError(f"{path} holds {size // 2:,} tokens, fewer than one block of {block_size} + 1: give more "
                        f"text or lower block_size")


def load_data(cfg: PretrainConfig, model_cfg: GPTConfig, rt) -> tuple[TokenBlocks, TokenBlocks]:
    from gpt2study.wikitext import ensure_prepared

    data_dir = Path(cfg.data_dir)
    once_per_run(rt, lambda: ensure_prepared(data_dir))
    sets = []
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.exists():
            raise UserError(f"{path} not found: prepare data first, e.g. python data/text/prepare.py "
                            f"--src 'FILES' --out_dir {data_dir}, or point --data_dir at prepared data")
        blocks = TokenBlocks(path, model_cfg.block_size, model_cfg.vocab_size)
        blocks.check_ids(path)
        sets.append(blocks)
    return sets[0], sets[1]


def build_model(cfg: PretrainConfig, resume_from: Path | None) -> GPT:
    options = asdict(pick(ModelOptions, cfg))
    if cfg.init_from == "scratch" and resume_from is None:
        return GPT(pick(GPTConfig, cfg))
    if resume_from is not None:
        model, source = GPT.from_file(resume_from / MODEL_FILE, **options), f"the run in {cfg.out_dir}"
    else:
        model, source = load_base(cfg.init_from, **options), f"init_from={cfg.init_from}"
    # the weights decide the architecture
    refuse_contradictions(cfg, model.config.architecture(), source,
                          "drop the setting, or start from scratch in another --out_dir")
    return model


def main():
    cfg = load_config(PretrainConfig, sys.argv[1:], doc=__doc__)
    with hold(cfg.out_dir, "run"):  # before anything reads or writes the run's folder
        run(cfg)


def run(cfg: PretrainConfig):
    resume_from = check_out_dir(cfg.out_dir, cfg.init_from)
    if resume_from is not None:
        if "lora" in run_info(resume_from):
            raise UserError(f"{cfg.out_dir} holds a LoRA fine-tuning run: resume it with python finetune.py "
                            f"--out_dir={cfg.out_dir} --init_from=resume")
        cfg = resumed_settings(cfg, resume_from)
        check_resume(cfg, resume_from, world_size())
    rt = setup_runtime(cfg)
    try:
        model = build_model(cfg, resume_from).to(rt.device)
        train_set, val_set = load_data(cfg, model.config, rt)
        if rt.master:
            print(f"model: {model.num_params() / 1e6:.1f}M parameters ({model.config.n_layer} layers, "
                  f"{model.config.n_head} heads, {model.config.n_embd} dims); {len(train_set):,} training blocks "
                  f"of {model.config.block_size} tokens; device {rt.device}, {cfg.dtype}, {rt.world} process(es)")
        fit(cfg, rt, model, train_set, val_set, export=lambda folder: model.save(folder / MODEL_FILE),
            run_info={"model": asdict(model.config), "data_dir": cfg.data_dir, "init_from": cfg.init_from},
            resume_from=resume_from)
    finally:
        teardown(rt)


if __name__ == "__main__":
    run_main(main)
