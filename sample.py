"""Continue prompts from a file with a trained model.

    python sample.py --prompts prompts.txt                          # the study's latest pretraining run
    python sample.py --prompts prompts.txt --model out/pretrain_small --greedy
    python sample.py --prompts prompts.txt --model gpt2-medium --temperature 0.8 --top_p 0.95

Each prompt is printed with its continuation, and appended, with the settings, to samples.txt
beside the model (or --out) as soon as it is made.
"""

import datetime
import sys
import warnings
from pathlib import Path

import torch

from gpt2study.cli import load_config, resolve_device, run_main
from gpt2study.loading import load_model, resolve
from gpt2study.settings import SampleConfig
from gpt2study.tokenizer import EOT, decode, encode
from model import UserError


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompt file {path} is a folder, not a file" if path.is_dir() else
                        f"prompt file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8 {path}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} is empty: write one prompt per line")
    return prompts


def fit_prompt(ids: list[int], room: int, prompt: str) -> list[int]:
    """Keep the last `room` tokens of a prompt too long for the context, with a warning."""
    if len(ids) > room:
        warnings.warn(f"prompt {prompt[:40]!r}... has {len(ids)} tokens; only its last {room} fit the context "
                      f"with max_new_tokens, so it is cut from the left", stacklevel=2)
        ids = ids[-room:]
    return ids or [EOT]  # an empty prompt starts from the document boundary


def samples_file(cfg: SampleConfig, source: str) -> Path:
    """Where the samples go: --out, else samples.txt in the model's run folder (out/<name> for a hub name)."""
    if cfg.out:
        return Path(cfg.out)
    path = Path(source)
    if path.is_file():
        path = path.parent
    if path.name.startswith("checkpoint") and (path.parent / "metrics.jsonl").exists():
        path = path.parent  # a checkpoint folder: its run's folder
    return (path if path.is_dir() else Path("out") / source) / "samples.txt"


def main():
    cfg = load_config(SampleConfig, sys.argv[1:], doc=__doc__)
    prompts = read_prompts(Path(cfg.prompts))
    device = resolve_device(cfg.device)
    source = resolve(cfg.model)
    model = load_model(source).to(device).eval()
    room = model.config.block_size - cfg.max_new_tokens
    if room < 1:
        raise UserError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in the model's context "
                        f"of {model.config.block_size} tokens")
    generator = torch.Generator(device).manual_seed(cfg.seed)
    out = samples_file(cfg, source)
    greedy = cfg.greedy or cfg.temperature == 0
    how = "greedy" if greedy else (f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, "
                                   f"seed {cfg.seed}")
    settings = f"model {source}; {how}; max_new_tokens {cfg.max_new_tokens}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {settings}\n")
        for prompt in prompts:
            ids = fit_prompt(encode(prompt), room, prompt)
            idx = torch.tensor([ids] * cfg.num_samples, device=device)
            rows = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, greedy=greedy, stop_token=EOT, generator=generator)
            print(f"\n=== {prompt}")
            for row in rows.tolist():
                new = row[len(ids):]
                text = decode(new[:new.index(EOT)] if EOT in new else new)
                print(f"--- {prompt}{text}" if cfg.num_samples > 1 else f"{prompt}{text}")
                f.write(f"{prompt}{text}".replace("\n", " ") + "\n")
            f.flush()  # each continuation is kept as soon as it is made
        f.write("\n")
    print(f"\nsamples appended to {out}")


if __name__ == "__main__":
    run_main(main)
