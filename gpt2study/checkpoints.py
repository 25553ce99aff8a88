"""A run's folder on disk: its checkpoints, written so that a crash never leaves a torn one.

    out_dir/checkpoint/        the last complete checkpoint: the weights (model.safetensors or
                               adapter.safetensors), train_state.pt (optimizer, schedule and data
                               position), config.json (what the run was and is)
    out_dir/checkpoint.old/    the one before: what a resume falls back to when checkpoint/ is
                               missing (a crash between the renames of a save) or broken
    out_dir/checkpoint.bad/    a broken checkpoint/ set aside by the first save after such a fallback
    out_dir/metrics.jsonl, tb/ the run's records (trainer.RunLog)
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2study.cli import check_settings, coerce, field_types
from model import GPTConfig, UserError, warn_once

MODEL_FILE, ADAPTER_FILE = "model.safetensors", "adapter.safetensors"
CKPT, CKPT_TMP, CKPT_OLD, CKPT_BAD = "checkpoint", "checkpoint.tmp", "checkpoint.old", "checkpoint.bad"
STATE_FILE = "train_state.pt"
# config.json's "format": raised when a checkpoint changes so that an older version cannot read it
CHECKPOINT_FORMAT = 1
UPDATE = "it was written by a newer version of this project: update the code (git pull) to use it"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:150]


def _safetensors_metadata(path: Path) -> dict:
    """The file's metadata, after safetensors has checked that its header is whole and the file
    holds every byte the header promises (a truncated file fails here)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder, as '<file> <problem>'; None when it is intact.

    Cheap enough for every resume and every save: each file is there and readable to its end
    (train_state.pt through a memory map, the weights by their header), and the weights are those
    of the run config.json describes. A pickle that is more than tensors is refused, not run.
    """
    ckpt = Path(ckpt)
    path = ckpt / "config.json"
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("train"), dict) or "model" not in info:
            return f"{path} is not a checkpoint's config.json"
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as e:  # ValueError: torn JSON, or bytes that are not UTF-8
        return f"{path} is truncated or corrupt ({_first_line(e)})"
    fmt = info.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > CHECKPOINT_FORMAT:
        return f"{path} is of checkpoint format {fmt!r}, this version reads format {CHECKPOINT_FORMAT}: {UPDATE}"
    path = ckpt / STATE_FILE
    if not path.is_file():
        return f"{path} is missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, foreign bytes, or a pickle that would run code
        return f"{path} is truncated, corrupt or not a checkpoint ({_first_line(e)})"
    if not isinstance(state, dict) or not {"step", "optimizer", "sampler"} <= state.keys():
        return f"{path} is not a training state (no step, optimizer and sampler)"
    if info.get("step") != state["step"]:
        return f"{path} is of step {state['step']} but config.json of step {info.get('step')}: files of two checkpoints"
    lora = "lora" in info
    path = ckpt / (ADAPTER_FILE if lora else MODEL_FILE)
    if not path.is_file():
        return f"{path} is missing"
    try:
        meta = _safetensors_metadata(path)
    except Exception as e:
        return f"{path} is truncated or not a safetensors file ({_first_line(e)})"
    try:
        if lora:
            saved, recorded = json.loads(meta["lora_config"]), info["lora"]
            arch = json.loads(meta["base_architecture"])
        else:
            saved = recorded = None
            arch = json.loads(meta["gpt_config"])
    except (KeyError, ValueError):
        return f"{path} is not {'an adapter' if lora else 'a model'} saved by this project (no config in its metadata)"
    unknown = unknown_model_settings(arch)
    if unknown:
        return f"{path} has model settings this version does not know ({', '.join(unknown)}): {UPDATE}"
    model = info["model"]
    if saved != recorded or any(model.get(k) != v for k, v in arch.items()):
        differ = [f"{k}={v} (config.json: {model.get(k)})" for k, v in arch.items() if model.get(k) != v]
        what = ", ".join(differ) or f"its LoRA {saved} (config.json: {recorded})"
        return f"{path} belongs to another model: {what}"
    return None


def unknown_model_settings(arch) -> list[str]:
    """The keys of a saved model's config that GPTConfig does not have (a newer version's), sorted."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    return sorted(set(arch) - known) if isinstance(arch, dict) else ["(not a mapping)"]


def check_model_file(path: Path) -> None:
    """A model file's metadata names a config this version can build: a UserError line otherwise."""
    try:
        arch = json.loads(_safetensors_metadata(path)["gpt_config"])
    except Exception:  # not there, torn, not ours: GPT.from_file says which, in one line
        return
    unknown = unknown_model_settings(arch)
    if unknown:
        raise UserError(f"{path} has model settings this version does not know ({', '.join(unknown)}): {UPDATE}")


def find_checkpoint(out_dir) -> Path | None:
    """The run's newest intact checkpoint folder: checkpoint/, else checkpoint.old/ (with a
    warning when checkpoint/ is there but broken); None when the run has none. A run whose
    checkpoints are all broken is a UserError that names what is wrong with each."""
    problems = []
    for name in (CKPT, CKPT_OLD):
        ckpt = Path(out_dir) / name
        if not ckpt.is_dir():
            continue
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                warn_once(f"{problems[0]}; using {ckpt} (step {run_info(ckpt)['step']}), the checkpoint before it")
            return ckpt
        problems.append(problem)
    if problems:
        raise UserError(f"no intact checkpoint in {out_dir}: {'; '.join(problems)}")
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir, export: Callable[[Path], None], state: dict, info: dict) -> Path:
    """Write a checkpoint into checkpoint.tmp, check it, then swap it in by renames: the
    previous checkpoint becomes checkpoint.old, so that at every moment an intact one is on disk.
    A write that fails (a full disk) removes the temporary folder and is a UserError."""
    out_dir = Path(out_dir)
    tmp, final, old = out_dir / CKPT_TMP, out_dir / CKPT, out_dir / CKPT_OLD
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        export(tmp)
        with open(tmp / STATE_FILE, "wb") as f:  # through Python's file: a failed write raises OSError
            torch.save(state, f)
        (tmp / "config.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, **info}, indent=2, default=str))
        for f in tmp.iterdir():  # on disk before the swap, so a crash cannot leave a torn checkpoint
            _fsync(f)
        # some writers (safetensors) can lose a failed write without a word: read back what is there
        problem = checkpoint_problem(tmp)
    except OSError as e:
        problem = f"{e.strerror or _first_line(e)}" + (f" ({e.filename})" if e.filename else "")
    if problem is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = next((c for c in (final, old) if c.is_dir() and checkpoint_problem(c) is None), None)
        where = f"the previous checkpoint (step {run_info(kept)['step']}) is intact in {kept}" if kept else \
            "no earlier checkpoint exists"
        raise UserError(f"could not write a checkpoint in {out_dir}: {problem}; {where}. Free some disk space and "
                        f"continue with --init_from=resume")
    if final.exists():
        if checkpoint_problem(final) is None:
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        else:  # the broken one a resume fell back from: set aside, never kept as the fallback
            shutil.rmtree(out_dir / CKPT_BAD, ignore_errors=True)
            final.rename(out_dir / CKPT_BAD)
    tmp.rename(final)
    _fsync(out_dir)
    return final


def load_train_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)


def check_out_dir(out_dir, init_from: str) -> Path | None:
    """The checkpoint to resume from (init_from='resume'), refusing to overwrite a run otherwise."""
    if init_from == "resume":
        ckpt = find_checkpoint(out_dir)
        if ckpt is None:
            raise UserError(f"nothing to resume: {out_dir} holds no checkpoint; start a new run without "
                            f"--init_from=resume")
        return ckpt
    try:
        ckpt = find_checkpoint(out_dir)
        held = f"checkpoint at step {run_info(ckpt)['step']}" if ckpt else None
    except UserError:
        held = "its checkpoints are broken"
    if held:
        raise UserError(f"{out_dir} already holds a run ({held}); continue it with --init_from=resume or choose "
                        f"another --out_dir")
    return None


def run_info(ckpt: Path) -> dict:
    """The checkpoint's config.json: what the run trains (model, LoRA, base) and its settings."""
    return json.loads((Path(ckpt) / "config.json").read_text())


def resumed_settings(cfg, ckpt: Path):
    """`cfg` for continuing the run in `ckpt`: every setting not given now is the run's own, so
    that `--init_from=resume` alone continues the run as it was started. The recorded values are
    checked like given ones (config.json is a file a user can edit)."""
    recorded = run_info(ckpt).get("train", {})
    types = field_types(type(cfg))
    keep = set(types) - set(cfg.given) - {"init_from"}
    values = {k: coerce(k, v, types[k]) for k, v in recorded.items() if k in keep}
    resumed = dataclasses.replace(cfg, **values)
    resumed.given = cfg.given
    check_settings(resumed)
    return resumed


def refuse_contradictions(cfg, fixed: dict, source: str, remedy: str) -> None:
    """A setting given now (config file or command line) that contradicts what `source` fixes (the weights'
    architecture, a resumed run's LoRA) is refused in one line, not printed and then ignored."""
    for key, value in fixed.items():
        if key in cfg.given and getattr(cfg, key) != value:
            raise UserError(f"{source} has {key}={value!r}, not {getattr(cfg, key)!r}: {remedy}")
