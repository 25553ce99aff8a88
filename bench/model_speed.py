"""Our GPT-2 against transformers' GPT2LMHeadModel: a training step and KV-cache generation.

    python bench/model_speed.py                 # CPU defaults: the study's 6-layer model, fp32
    python bench/model_speed.py --device=cuda --dtype=bfloat16 --batch=16 --seq=1024

Both models get the same config, the same weights (a random transformers model, loaded into
ours through hf_format.load_hf_model), the same batch and dtype, measured in the same run.
A training step is forward + backward + AdamW; generation is greedy decoding of
--new_tokens tokens per row with a KV cache (`GPT.generate` against `generate(do_sample=False)`,
both forced to the full length). Prints a Markdown table with tokens/s and the ratios.
"""

import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2study.cli import load_config, run_main
from gpt2study.hf_format import hf_config, load_hf_model
from model import GPTConfig, setting


@dataclass
class ModelBenchConfig:
    n_layer: int = setting(6, "transformer blocks", at_least=1)
    n_head: int = setting(12, "attention heads", at_least=1)
    n_embd: int = setting(768, "model width", at_least=1)
    batch: int = setting(4, "training batch", at_least=1)
    seq: int = setting(256, "training sequence length", at_least=1, at_most=1024)
    gen_batch: int = setting(1, "generation batch", at_least=1)
    prompt: int = setting(32, "prompt tokens for generation", at_least=1)
    new_tokens: int = setting(64, "tokens generated per row", at_least=1)
    repeats: int = setting(5, "timed repeats (the median is reported)", at_least=1)
    device: str = setting("cpu", "cpu or cuda", choices=("cpu", "cuda"))
    dtype: str = setting("float32", "float32, or bfloat16 autocast", choices=("float32", "bfloat16"))


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` calls, after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{cpu}, {torch.get_num_threads()} threads"


def main():
    args = load_config(ModelBenchConfig, sys.argv[1:], doc=__doc__)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dev = args.device
    # the same architecture on both sides, dropout off (ours defaults to none)
    hf_cfg = GPT2Config.from_dict(hf_config(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)))
    hf = GPT2LMHeadModel(hf_cfg)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf_model(folder)
    dtype = getattr(torch, args.dtype)
    hf, ours = hf.to(dev), ours.to(dev)
    autocast = torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32)

    x = torch.randint(0, 50257, (args.batch, args.seq + 1), device=dev)
    inputs, targets = x[:, :-1], x[:, 1:]

    def train_step(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast:
                loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    rows = []
    hf.train(), ours.train()
    t_hf = timed(train_step(hf, lambda m: m(input_ids=inputs, labels=inputs).loss), args.repeats, dev)
    t_ours = timed(train_step(ours, lambda m: m(inputs, targets)[1]), args.repeats, dev)
    tokens = args.batch * args.seq
    rows.append((f"training step (batch {args.batch} x {args.seq})", tokens / t_ours, tokens / t_hf))

    hf.eval(), ours.eval()
    prompt = torch.randint(0, 50257, (args.gen_batch, args.prompt), device=dev)
    n = args.new_tokens

    def hf_generate():
        with torch.no_grad(), autocast:
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=50256)

    def our_generate():
        with autocast:
            ours.generate(prompt, n, greedy=True)

    t_hf, t_ours = timed(hf_generate, args.repeats, dev), timed(our_generate, args.repeats, dev)
    tokens = args.gen_batch * n
    rows.append((f"greedy generation (batch {args.gen_batch}, {args.prompt} + {n} tokens)", tokens / t_ours,
                 tokens / t_hf))

    print(f"\nGPT-2 {args.n_layer} layers / {args.n_head} heads / {args.n_embd} dims, {args.dtype}, "
          f"on {machine(dev)}; torch {torch.__version__}\n")
    print("| measurement | ours (tokens/s) | transformers (tokens/s) | ours / transformers |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")


if __name__ == "__main__":
    run_main(main)
