"""Beam-search speed: our decoding.beam_search against transformers' GPT2LMHeadModel.generate.

    python bench/beam.py [--n=20] [--batch=10] [--round=100] [--no_refill] [--model=RUN_OR_FILE [--adapter=ADAPTER]]
                         [--data_dir=data/e2e/prepared]

Both decode the first --n MRs of the E2E test set (prompt: linearised MR + " ||") with beam 10,
length penalty 0.8, no repeated 4-gram, at most 64 new tokens, stop at EOT, on the same
weights, fp32, in one run, with at most --batch MRs side by side (padded on the left):
transformers a batch at a time, ours taking the next MR as soon as one is done (continuous
batching; --no_refill: a batch at a time as well). The weights: a random GPT-2 (GPTConfig's
size by default) made by transformers and loaded into ours with hf_format.load_hf_model, or with
--model a model of ours (a run folder or a file; with --adapter its LoRA adapter merged in)
exported into transformers. With random weights the model almost never picks EOT, so every
hypothesis runs to 64 tokens: the bench then measures the steady per-token cost, not early
stopping (where ours also drops finished MRs); `bash bench/beam_model.sh` trains a model of
the study's shape whose outputs end as a fine-tuned model's do (--model out/e2e_lm_6l). The
two decoders take turns, --round MRs each, so that load from other processes on a shared
machine falls on both alike; the table gives wall and CPU seconds.

Why the outputs can differ although the search is the same (scores are sum_logprob /
n_generated**length_penalty with EOT counted, only the top `beam` of the 2·beam candidates
may finish, the same early_stopping=False heuristic):
- no-repeat n-grams: transformers also bans n-grams of the prompt; ours only those of the
  continuation, so that an output can copy a name such as "Crowne Plaza Hotel" from the MR;
- numerics: the two models compute attention and the MLP in a different order (ours: fused
  SDPA with a padding mask), so log-probs differ in the last bits, and near-ties break
  differently. Random weights give an almost uniform next-token distribution over 50,257
  tokens, where near-ties are everywhere; a trained model has far fewer;
- older transformers releases divided by the whole sequence length, prompt included; 5.x
  divides by the generated length, as ours does.
"""

import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2study.cli import load_config, run_main
from gpt2study.decoding import beam_search, left_pad
from gpt2study.e2e_data import DEFAULT_OUT as E2E_DATA
from gpt2study.e2e_data import ensure_prepared, load_prepared
from gpt2study.tokenizer import EOT
from model import GPT, GPTConfig, UserError, setting

SEARCH = dict(beam_size=10, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=64)


@dataclass
class BeamBenchConfig:
    n: int = setting(20, "MRs to decode", at_least=1)
    batch: int = setting(10, "MRs per batch", at_least=1)
    round: int = setting(100, "MRs per turn of each decoder", at_least=1)
    no_refill: bool = setting(False, "ours a batch at a time too (no continuous batching)")
    model: str = setting("", "a model of ours: run folder or .safetensors (default: random weights)")
    adapter: str = setting("", "with --model: a LoRA adapter to merge into it")
    data_dir: str = setting(str(E2E_DATA), "prepared E2E data (data/e2e/prepare.py); the default is prepared "
                            "on first use")
    seed: int = setting(0, "seed of the random weights")
    threads: int = setting(0, "CPU threads (0: torch's choice)", at_least=0)


def read_prompts(data_dir: str, n: int) -> list[list[int]]:
    """The first n test MRs as fine-tuning formats them (token ids), in test-set order."""
    return [r["prompt"] for r in load_prepared(ensure_prepared(Path(data_dir)), "test")[:n]]


def random_models(cfg: GPTConfig, seed: int):
    """A random transformers GPT-2 of cfg's size (dropout off), and the same weights loaded into ours."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from gpt2study.hf_format import hf_config, load_hf_model

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config.from_dict(hf_config(dataclasses.replace(cfg, dropout=0.0))))
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf_model(folder)
    return ours, hf


def to_transformers(model: GPT):
    """Our weights in a transformers GPT2LMHeadModel (through hf_format's export)."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    from gpt2study.hf_format import save_hf_model

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        save_hf_model(model, folder)
        return GPT2LMHeadModel.from_pretrained(folder)


def hf_beam_search(hf, prompts: list[list[int]], max_new_tokens: int = SEARCH["max_new_tokens"]) -> list[list[int]]:
    idx, pad = left_pad(prompts, EOT, hf.device)
    columns = torch.arange(idx.size(1), device=idx.device)
    mask = torch.ones_like(idx) if pad is None else (columns >= pad[:, None]).long()
    out = hf.generate(input_ids=idx, attention_mask=mask, num_beams=SEARCH["beam_size"],
                      length_penalty=SEARCH["length_penalty"], no_repeat_ngram_size=SEARCH["no_repeat_ngram_size"],
                      max_new_tokens=max_new_tokens, early_stopping=False, do_sample=False,
                      eos_token_id=EOT, pad_token_id=EOT)
    return [s[:s.index(EOT)] if EOT in s else s for s in out[:, idx.size(1):].tolist()]


def main() -> None:
    args = load_config(BeamBenchConfig, sys.argv[1:], doc=__doc__)
    if args.adapter and not args.model:
        raise UserError("--adapter needs --model (the base it adapts)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        raise UserError("the bench compares against transformers: pip install transformers") from None

    prompts = read_prompts(args.data_dir, args.n)
    if args.model:
        from gpt2study.loading import load_model
        from lora import load_adapter, merge_and_unload

        ours, weights = load_model(args.model), args.model
        if args.adapter:
            load_adapter(ours, Path(args.adapter))
            ours, weights = merge_and_unload(ours), f"{args.model} + LoRA {args.adapter}"
        hf = to_transformers(ours)
    else:
        ours, hf = random_models(GPTConfig(), args.seed)
        weights = f"random (seed {args.seed})"
    ours.eval()
    hf.eval()
    cfg = ours.config
    with torch.inference_mode():
        x = torch.tensor(prompts[:1])
        logit_gap = (ours(x)[0] - hf(x).logits).abs().max().item()
    # one small call each first, so that neither pays for one-time setup in the timing
    beam_search(ours, prompts[:2], **{**SEARCH, "max_new_tokens": 2})
    hf_beam_search(hf, prompts[:2], max_new_tokens=2)

    def batch_by_batch(decode, mrs):
        return [out for i in range(0, len(mrs), args.batch) for out in decode(mrs[i:i + args.batch])]

    def ours_run(mrs):
        if args.no_refill:
            return batch_by_batch(lambda b: beam_search(ours, b, **SEARCH, eos=EOT), mrs)
        return beam_search(ours, mrs, **SEARCH, eos=EOT, max_live=args.batch)

    ours_name = f"ours (decoding.beam_search, {'a batch at a time' if args.no_refill else 'continuous batching'})"
    decoders = {ours_name: ours_run,
                "transformers generate": lambda r: batch_by_batch(lambda b: hf_beam_search(hf, b), r)}
    outputs = {name: [] for name in decoders}
    wall, cpu = dict.fromkeys(decoders, 0.0), dict.fromkeys(decoders, 0.0)
    with torch.inference_mode():
        for start in range(0, len(prompts), args.round):  # taking turns, so that load falls on both alike
            mrs = prompts[start:start + args.round]
            for name, run in decoders.items():
                w, c = time.perf_counter(), time.process_time()
                outputs[name] += run(mrs)
                wall[name] += time.perf_counter() - w
                cpu[name] += time.process_time() - c

    n = len(prompts)
    print(f"{n} E2E test MRs, {args.batch} side by side, beam {SEARCH['beam_size']}, "
          f"length penalty {SEARCH['length_penalty']}, no-repeat {SEARCH['no_repeat_ngram_size']}-grams, "
          f"≤ {SEARCH['max_new_tokens']} new tokens; CPU fp32, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, vocab {cfg.vocab_size}, "
          f"weights {weights}; max |logit difference| ours vs transformers: {logit_gap:.1e}\n")
    print("| decoder | new tokens | wall s | CPU s | tokens/s | MRs/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, outs in outputs.items():
        tokens = sum(map(len, outs))
        print(f"| {name} | {tokens} | {wall[name]:.1f} | {cpu[name]:.1f} | {tokens / wall[name]:.1f} | "
              f"{n / wall[name]:.2f} |")
    (ours_name, ours_out), (hf_name, hf_out) = outputs.items()
    print(f"\nspeed ours/transformers: {wall[hf_name] / wall[ours_name]:.2f}× (wall), "
          f"{cpu[hf_name] / cpu[ours_name]:.2f}× (CPU time)")
    same = sum(a == b for a, b in zip(ours_out, hf_out))
    ended = [sum(len(o) < SEARCH["max_new_tokens"] for o in outs) for outs in (ours_out, hf_out)]
    print(f"identical outputs: {same}/{n} MRs; outputs ending in EOT before {SEARCH['max_new_tokens']} tokens: "
          f"ours {ended[0]}/{n}, transformers {ended[1]}/{n}")


if __name__ == "__main__":
    run_main(main)
