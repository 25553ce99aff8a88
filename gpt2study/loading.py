"""Which model a path names, loaded: every entry point takes the same kinds of path.

    latest                        the study's newest pretraining run (out/pretrain_continue, out/pretrain)
    out/pretrain                  a pretraining run's folder (its checkpoint/ or checkpoint.old/)
    out/pretrain/checkpoint       a checkpoint folder
    .../model.safetensors         a model file saved by GPT.save
    out/lora_e2e                  a LoRA run: the base it recorded, with its adapter
    a Hugging Face GPT-2 folder   config.json + model.safetensors (or pytorch_model.bin)
    a PEFT LoRA adapter folder    adapter_config.json + adapter_model.safetensors, on its base
    gpt2, gpt2-medium, ...        OpenAI's weights from the Hugging Face Hub (hub.py)
"""

import json
from pathlib import Path

from gpt2study.checkpoints import ADAPTER_FILE, MODEL_FILE, check_model_file, find_checkpoint, run_info
from model import GPT, UserError

LATEST = "latest"
# Where the study's pretraining runs leave their weights, latest first, and the configs that make them.
STUDY_RUNS = {"out/pretrain_continue": "config/pretrain_continue.py", "out/pretrain": "config/pretrain.py"}


def latest_pretrained() -> str:
    for run in STUDY_RUNS:
        ckpt = find_checkpoint(run)
        if ckpt is not None and (ckpt / MODEL_FILE).exists():
            return run
    raise UserError(f"no pretrained model found in {' or '.join(STUDY_RUNS)}: train one with "
                    f"python train.py config/pretrain.py, or pass another model (a run folder, a file, gpt2-medium)")


def resolve(spec: str) -> str:
    """'latest' made concrete; any other spec as it is."""
    return latest_pretrained() if spec == LATEST else spec


def _checkpoint_of(path: Path) -> Path | None:
    """The checkpoint folder a run folder or checkpoint folder names, if it is one."""
    if (path / "train_state.pt").exists():
        return path
    return find_checkpoint(path) if path.is_dir() else None


def adapter_of(spec: str) -> tuple[str, Path] | None:
    """(base spec, adapter path) when `spec` names a LoRA run (ours) or a PEFT adapter folder."""
    path = Path(spec)
    ckpt = _checkpoint_of(path)
    if ckpt is not None and (ckpt / ADAPTER_FILE).exists():
        return run_info(ckpt)["base"], ckpt / ADAPTER_FILE
    if (path / "adapter_config.json").exists():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}/adapter_config.json names no base_model_name_or_path: pass the base with --base")
        return base, path
    return None


def check_adapter_file(path: Path) -> None:
    """An adapter file's metadata is whole and names a LoRA this version knows: a UserError line otherwise."""
    from lora import LoRAConfig, read_adapter_meta

    try:
        LoRAConfig(**read_adapter_meta(path)["lora_config"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"adapter {path} has metadata this version cannot read ({type(e).__name__}: "
                        f"{str(e)[:100]}): the file is damaged, or from a newer version of this project") from None


def load_adapter_into(model: GPT, adapter: Path) -> None:
    """Our adapter file, or a PEFT adapter folder, into `model` (which must be its base)."""
    if adapter.is_dir():
        from gpt2study.hf_format import load_peft_adapter

        load_peft_adapter(model, adapter)
    else:
        from lora import load_adapter

        check_adapter_file(adapter)
        load_adapter(model, adapter)


def load_model(spec: str, **options) -> GPT:
    """The model `spec` names (see the module docstring); `options` set ModelOptions' fields."""
    spec = resolve(spec)
    lora = adapter_of(spec)
    if lora is not None:
        base, adapter = lora
        model = load_base(base, **options)
        load_adapter_into(model, adapter)
        return model
    return load_base(spec, **options)


def _from_file(path: Path, **options) -> GPT:
    check_model_file(path)
    return GPT.from_file(path, **options)


def load_base(spec: str, **options) -> GPT:
    """A model without an adapter: our run, checkpoint or file, or a Hugging Face GPT-2."""
    spec = resolve(spec)
    path = Path(spec)
    ckpt = _checkpoint_of(path)
    if ckpt is not None:
        if not (ckpt / MODEL_FILE).exists():
            raise UserError(f"{spec} holds no model ({ckpt} has no {MODEL_FILE})")
        return _from_file(ckpt / MODEL_FILE, **options)
    if path.is_dir() and (path / MODEL_FILE).exists() and not (path / "config.json").exists():
        return _from_file(path / MODEL_FILE, **options)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"model file {path} not found")
        return _from_file(path, **options)
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"{spec} holds no model: expected a run folder with checkpoint/{MODEL_FILE}, a model file, "
                        f"or a Hugging Face folder with config.json")
    from gpt2study.hf_format import load_hf_model
    from gpt2study.pretrained import gpt2_folder

    return load_hf_model(gpt2_folder(spec), **options)
