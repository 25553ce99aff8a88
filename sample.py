"""Continue prompts with a trained model.

    python sample.py --prompts prompts.txt                      # the study's pretrained model
    python sample.py --prompts prompts.txt --ckpt out/pretrain_small --greedy
    python sample.py --prompts prompts.txt --init_from gpt2-medium

One prompt per line. Each prompt is printed with its continuations, and all of them are
appended (with the settings used) to samples.txt in the checkpoint's folder.
"""

import argparse
import datetime
import warnings
from pathlib import Path

import torch

from common import UserError, default_base, load_model, run_main
from tokenizer import EOT, decode, encode


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompt file {path} not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=Path, default=Path("prompts.txt"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="a run folder of ours (default: the study's latest pretraining run)")
    src.add_argument("--init_from", help="a Hugging Face GPT-2: gpt2, gpt2-medium, ... or a local folder")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="file the samples are appended to (default: <model folder>/samples.txt)")
    a = p.parse_args()

    prompts = read_prompts(a.prompts)
    source = a.init_from or a.ckpt or default_base()
    model = load_model(source).to(a.device).eval()
    room = model.config.block_size - a.max_new_tokens
    if room < 1:
        raise UserError(f"max_new_tokens ({a.max_new_tokens}) leaves no room for a prompt in the model's context "
                        f"of {model.config.block_size} tokens")
    generator = torch.Generator(a.device).manual_seed(a.seed)
    out = a.out or (Path(source) if Path(source).is_dir() and not a.init_from else Path("out") / source) / "samples.txt"
    settings = (f"model {source}; " + ("greedy" if a.greedy else f"temperature {a.temperature}, top_k {a.top_k}, "
                                       f"top_p {a.top_p}, seed {a.seed}") + f"; max_new_tokens {a.max_new_tokens}")
    lines = [f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {settings}"]
    for prompt in prompts:
        ids = fit_prompt(encode(prompt), room, prompt)
        idx = torch.tensor([ids] * a.num_samples, device=a.device)
        rows = model.generate(idx, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              greedy=a.greedy, stop_token=EOT, generator=generator)
        print(f"\n=== {prompt}")
        for row in rows.tolist():
            new = row[len(ids):]
            text = decode(new[:new.index(EOT)] if EOT in new else new)
            print(f"--- {prompt}{text}" if a.num_samples > 1 else f"{prompt}{text}")
            lines.append(f"{prompt}{text}".replace("\n", " ") + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")
    print(f"\nsamples appended to {out}")


if __name__ == "__main__":
    run_main(main)
