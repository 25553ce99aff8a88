"""Continuing many prompts at once: beam search (decoding/beam.py), greedy decoding and sampling.

E2E outputs are decoded with beam search (beam 10, length penalty 0.8, no repeated 4-gram,
at most 64 new tokens, stop at end-of-text), as in the LoRA paper's E2E setup:

    from gpt2study.decoding import continuations
    outputs = continuations(model, prompts)  # token ids per prompt, EOT stripped, in input order

Prompts of different lengths share a batch by padding on the left (decoding/batch.py), so that
every row's next token sits in the last column.
"""

import torch

from gpt2study.tokenizer import EOT
from model import UserError

from .batch import check_prompts, eval_mode, left_pad, strip_after
from .beam import BEAM_RULES, beam_hypotheses, beam_search

__all__ = ["BEAM_RULES", "METHODS", "beam_hypotheses", "beam_search", "continuations", "generate_batch", "left_pad"]

METHODS = ("beam", "greedy", "sample")
ROWS_PER_BATCH = {"cpu": 100, "cuda": 512}  # sequences decoded side by side (prompts × beams)


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int = 64, eos: int = EOT, greedy: bool = False,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Greedy or sampled continuations of all prompts in one batch (`model.generate`), EOT stripped."""
    idx, pad = left_pad(prompts, eos, model.lm_head.weight.device)
    with eval_mode(model):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy, stop_token=eos, generator=generator, pad=pad)
    return [strip_after(s, eos) for s in out[:, idx.size(1):].tolist()]


def default_batch_size(model, method: str = "beam", beam_size: int = 10) -> int:
    """Prompts per batch: about ROWS_PER_BATCH sequences side by side (each beam is one)."""
    rows = ROWS_PER_BATCH["cuda" if model.lm_head.weight.is_cuda else "cpu"]
    return max(1, rows // (beam_size if method == "beam" else 1))


def continuations(model, prompts: list[list[int]], method: str = "beam", batch_size: int | None = None,
                  progress: bool = True, all_hypotheses: bool = False, **kw) -> list:
    """Continuations of all prompts, EOT stripped, in input order; with all_hypotheses (beam
    search only), each prompt's final beam instead: (tokens, score) pairs, best first.

    method: 'beam' (keywords of `beam_search`), 'greedy' or 'sample' (keywords of
    `generate_batch`). Prompts go in by length, longest first, so that rows side by side carry
    little padding and the first ones show the peak memory. batch_size counts prompts decoded
    side by side (default: `default_batch_size`); beam search takes the next prompt as soon as
    one is done, greedy decoding and sampling go a batch at a time.
    """
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
    if all_hypotheses and method != "beam":
        raise UserError("all_hypotheses: only beam search has a final beam")
    if batch_size is None:
        batch_size = default_batch_size(model, method, kw.get("beam_size", 10))
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    check_prompts(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ordered = [prompts[i] for i in order]
    if kw.get("finish_penalty") is not None:  # it speaks of prompts in input order
        penalty = kw["finish_penalty"]
        kw["finish_penalty"] = lambda i, tokens: penalty(order[i], tokens)
    outputs: list = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=f"{method} decoding", unit="prompt", disable=not progress) as bar:
        if method == "beam":
            search = beam_hypotheses if all_hypotheses else beam_search
            results = search(model, ordered, max_live=batch_size, on_done=bar.update, **kw)
        else:
            results = []
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start:start + batch_size]
                results += generate_batch(model, batch, greedy=method == "greedy", **kw)
                bar.update(len(batch))
    for i, r in zip(order, results):
        outputs[i] = r
    return outputs
