"""Export a model or a LoRA run for Hugging Face transformers and PEFT.

    python export.py out/pretrain --out hf/pretrain              # a GPT-2 folder for transformers
    python export.py out/lora_e2e --out hf/lora_e2e              # a PEFT adapter (+ base/ if the base is ours)
    python export.py out/lora_e2e --out hf/lora_e2e_merged --merged   # base + adapter as one GPT-2 folder

RUN is any model sample.py takes: a pretraining run, a model file, a Hugging Face folder, or a
LoRA run (ours, or a PEFT adapter folder). A model becomes config.json, model.safetensors,
generation_config.json and GPT-2's tokenizer files, for GPT2LMHeadModel.from_pretrained(DIR) and
AutoTokenizer.from_pretrained(DIR). A LoRA run becomes a PEFT adapter for
PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), DIR), where BASE is the hub
name or folder its base came from, or DIR/base, written beside it when the base is one of ours.
DIR must not exist yet, or be empty.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import lora
from gpt2study import hf_format, loading
from gpt2study.cli import load_config, run_main
from gpt2study.pretrained import HF_GPT2_NAMES, HUB_ORG
from gpt2study.settings import ExportConfig
from model import UserError


def transformers_name(spec: str) -> str | None:
    """The name transformers loads the base `spec` by, if it is a Hugging Face folder or hub name."""
    path = Path(spec)
    if path.is_dir():
        hf = (path / "config.json").is_file() and not any((path / n).exists() for n in ("checkpoint", "train_state.pt"))
        return spec if hf else None
    name = spec.removeprefix(f"{HUB_ORG}/")
    return f"{HUB_ORG}/{name}" if name in HF_GPT2_NAMES else None


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder: export into a new one")


def export(cfg: ExportConfig, tmp: Path) -> str:
    """Write the export into `tmp`; returns what was written, for the user."""
    out = Path(cfg.out)
    found = loading.adapter_of(loading.resolve(cfg.run))
    if found is None:
        if cfg.merged:
            print(f"{cfg.run} has no adapter: --merged changes nothing")
        hf_format.save_hf_model(loading.load_base(cfg.run), tmp)
        return f"a GPT-2 model: GPT2LMHeadModel.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')"
    base, adapter = found
    model = loading.load_base(base)
    if cfg.merged:
        loading.load_adapter_into(model, adapter)
        hf_format.save_hf_model(lora.merge_and_unload(model), tmp)
        return f"base {base} with its adapter merged in: GPT2LMHeadModel.from_pretrained('{out}')"
    if adapter.is_file():  # ours: refuse what PEFT cannot hold before writing a base for it
        hf_format.check_peft_exportable(lora.LoRAConfig(**lora.read_adapter_meta(adapter)["lora_config"]))
    name = transformers_name(base)
    if name is None:
        hf_format.save_hf_model(model, tmp / "base")
        name = str(out / "base")
    loading.load_adapter_into(model, adapter)
    hf_format.save_peft_adapter(model, tmp, name)
    return (f"a PEFT adapter on {name}: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('{name}'), "
            f"'{out}')")


def main():
    cfg = load_config(ExportConfig, sys.argv[1:], doc=__doc__)
    out = Path(cfg.out)
    check_out(out)
    # written beside DIR and renamed into place at the end: a failed export leaves nothing behind
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        what = export(cfg, tmp)
        check_out(out)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {what}")


if __name__ == "__main__":
    run_main(main)
