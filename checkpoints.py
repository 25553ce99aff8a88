"""A run's folder on disk: its checkpoint, written so that a crash never leaves a torn one.

    out_dir/checkpoint/        the last complete checkpoint: the weights (model.safetensors or
                               adapter.safetensors), train_state.pt (optimizer, schedule and data
                               position, RNG states), config.json (what the run was and is)
    out_dir/checkpoint.old/    the one before, while a new one is being swapped in
    out_dir/metrics.jsonl, tb/ the run's records (trainer.RunLog)
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from common import UserError

MODEL_FILE, ADAPTER_FILE = "model.safetensors", "adapter.safetensors"
CKPT, CKPT_TMP, CKPT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
STATE_FILE = "train_state.pt"


def find_checkpoint(out_dir) -> Path | None:
    """The run's last complete checkpoint folder, if any.

    A checkpoint is written into checkpoint.tmp and then swapped in by renames; a crash
    between the two renames leaves the previous one as checkpoint.old, which is used.
    """
    for name in (CKPT, CKPT_OLD):
        if (Path(out_dir) / name / STATE_FILE).exists():
            return Path(out_dir) / name
    return None


def save_checkpoint(out_dir, export: Callable[[Path], None], state: dict, run_info: dict) -> Path:
    out_dir = Path(out_dir)
    tmp, final, old = out_dir / CKPT_TMP, out_dir / CKPT, out_dir / CKPT_OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export(tmp)
    torch.save(state, tmp / STATE_FILE)
    (tmp / "config.json").write_text(json.dumps(run_info, indent=2, default=str))
    for f in tmp.iterdir():  # on disk before the swap, so a crash cannot leave a torn checkpoint
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def check_out_dir(out_dir, init_from: str) -> Path | None:
    """The checkpoint to resume from (init_from='resume'), refusing to overwrite a run otherwise."""
    ckpt = find_checkpoint(out_dir)
    if init_from == "resume":
        if ckpt is None:
            raise UserError(f"nothing to resume: {out_dir} holds no checkpoint; start a new run without "
                            f"--init_from=resume")
        return ckpt
    if ckpt is not None:
        step = load_train_state(ckpt)["step"]
        raise UserError(f"{out_dir} already holds a run (checkpoint at step {step}); continue it with "
                        f"--init_from=resume or choose another --out_dir")
    return None


def run_info(ckpt: Path) -> dict:
    """The checkpoint's config.json: what the run trains (model, LoRA, base) and its settings."""
    return json.loads((ckpt / "config.json").read_text())


def resumed_settings(cfg, ckpt: Path):
    """`cfg` for continuing the run in `ckpt`: every setting not given now is the run's own, so
    that `--init_from=resume` alone continues the run as it was started."""
    recorded = run_info(ckpt).get("train", {})
    keep = {f.name for f in dataclasses.fields(cfg)} - set(cfg.given) - {"init_from"}
    resumed = dataclasses.replace(cfg, **{k: v for k, v in recorded.items() if k in keep})
    resumed.given = cfg.given
    return resumed
