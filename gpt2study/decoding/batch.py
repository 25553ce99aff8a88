"""Prompts side by side: left padding, and the little every decoder needs around a batch."""

from contextlib import contextmanager

import torch

from model import UserError


def check_prompts(prompts) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("decoding needs at least one prompt, and every prompt needs at least one token")


def left_pad(prompts, fill: int, device):
    """(B, T) long tensor of the prompts padded on the left with `fill`, and the (B,) padding per
    row, or None when every prompt has the same length (the cache then needs no mask)."""
    check_prompts(prompts)
    T = max(map(len, prompts))
    pads = [T - len(p) for p in prompts]
    idx = torch.tensor([[fill] * n + list(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    return idx, (torch.tensor(pads, device=device) if any(pads) else None)


def strip_after(tokens: list[int], eos: int) -> list[int]:
    """The tokens before the first `eos`."""
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@contextmanager
def eval_mode(model):
    # Dropout would make decoding random; the caller's mode comes back afterwards.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
